"""Every notebook runs end to end in the `smoke` profile (a few steps each) and shows what it saves, so a broken
notebook fails CI; together they write every file the report includes. The runner restarts a sequence, shows a
notebook's own output and hides the kernel's transport warning; a notebook picks up an edit without a restart.

Each notebook runs once per session: tests/test_browser.py runs every one with Run All in JupyterLab and checks what
the runner of `make figures` checks (`output_problems`) and more, so the runner here runs one real notebook (every
notebook where the browser test cannot run); its checks have their own tests below, on small notebooks."""

import json
import re
from pathlib import Path

import nbformat
import pytest

from course import run_notebooks
from course.run_notebooks import TRANSPORT_WARNING, NotebookError, list_notebooks, main, notebooks_from, run_notebook

ROOT = Path(__file__).parent.parent


def browser_runs_notebooks() -> bool:
    """Whether tests/test_browser.py runs every notebook this session: it can run here, and it is in this tree (a
    student release leaves it out)."""
    if not Path(__file__).with_name("test_browser.py").is_file():
        return False
    from test_browser import browser_missing

    return browser_missing() is None


# fig/ files that the report includes but no notebook writes: the benchmarks' results, make figures' timing table and
# make seeds' tables (written by fm.seeds / gm.seeds, whose smoke runs tests/test_seeds.py and test_gm_seeds.py check)
NOT_FROM_NOTEBOOKS = re.compile(r"^(bench_|kv_cache_bench_|gpu_probe|notebook_times_|seeds_)")
# the notebooks the runner of `make figures` runs here: all where the browser test cannot run them, else the
# quickest one (1_1: a few seconds), which the browser test runs again
HEADLESS = [p for p in list_notebooks() if p.name.startswith("1_1")] if browser_runs_notebooks() else list_notebooks()


def report_files() -> set[str]:
    """The fig/ files that report/template.md and its fragments include: `table` and `value` directives and images
    (plain links to per-setting images of the quick profile's larger sweeps are not included)."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "report").glob("*.md")))
    included = re.findall(r"\{\{\s*(?:table|value):\s*fig/([\w.\-]+)|!\[[^\]]*\]\(fig/([\w.\-]+)\)", text)
    return {name for pair in included for name in pair if name and not NOT_FROM_NOTEBOOKS.match(name)}


@pytest.mark.slow
@pytest.mark.parametrize("path", HEADLESS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_profile(path, notebook_dirs, notebooks_ran, monkeypatch):
    for name, value in notebook_dirs.items():
        monkeypatch.setenv(name, value)
    run_notebook(path, profile="smoke", timeout=600)  # raises on a failing cell or a figure saved but not shown
    notebooks_ran.add(path.name)


@pytest.mark.slow
@pytest.mark.after_notebooks
def test_notebooks_write_every_file_the_report_includes(notebook_dirs, notebooks_ran):
    if missed := sorted({p.name for p in list_notebooks()} - notebooks_ran):
        pytest.skip(f"needs the smoke run of every notebook in this session (not run: {', '.join(missed)})")
    written = {p.name for p in Path(notebook_dirs["HW3_FIG_DIR"]).iterdir()}
    assert report_files(), "no fig/ file found in report/*.md"
    assert sorted(report_files() - written) == []


def _notebook(tmp_path: Path, *sources: str) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    path = tmp_path / "probe.ipynb"
    nbformat.write(notebook, path)
    return path


SAVE_PNG = ("from matplotlib.figure import Figure\nfrom common import fig_dir\nfig = Figure()\n"
            "fig.subplots().plot([0, 1])\nfig.savefig(fig_dir() / 'probe.png')")


@pytest.mark.slow
@pytest.mark.parametrize("sources, problem", [
    ((SAVE_PNG,), "saves probe.png to fig/ but never displays it"),
    (("from IPython.display import Markdown\nMarkdown('![probe](/abs/fig/probe.png)')",), "displays a link to a file"),
    (("from pathlib import Path\nPath('/tmp/x.txt').write_text('12345')",), "stray return value 5"),
    (("from pathlib import Path\nPath('fig')",), "stray return value PosixPath('fig')"),
], ids=["figure not shown", "file link", "byte count", "path"])
def test_runner_fails_on_what_a_notebook_shows_badly(tmp_path, sources, problem):
    with pytest.raises(NotebookError, match=re.escape(problem)):
        run_notebook(_notebook(tmp_path, *sources), "smoke", timeout=120)


@pytest.mark.slow
def test_setup_notebook_shows_each_saved_figure_below_its_cell(tmp_path):
    """The first cell's hook shows the PNG a later cell saves, byte for byte, and nothing saved before it."""
    from nbclient import NotebookClient

    figures = run_notebooks.fig_dir()
    (figures / "old.png").write_bytes(b"saved before the notebook")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(s) for s in
                      ("from common.notebook import setup_notebook\nsetup_notebook()", "x = 1", SAVE_PNG)]
    NotebookClient(notebook, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert [sum("image/png" in o.get("data", {}) for o in c.outputs) for c in notebook.cells] == [0, 0, 1]
    assert run_notebooks.output_problems(notebook, [figures / "probe.png"]) == []
    assert run_notebooks.output_problems(notebook, [figures / "old.png"]) != []


@pytest.mark.slow
def test_an_edit_to_the_package_is_used_without_a_restart(tmp_path):
    """The notebooks' own first cell (`%autoreload 2 --full`): a function whose body the student edits runs its new
    code in the next cell, and inspect.getsource shows exactly the new function (IPython's default diff-based reload
    re-executes the changed function alone, with co_firstlineno 1: the source shown began at the top of the file)."""
    setup = next(c.source for c in nbformat.read(list_notebooks()[0], as_version=4).cells if c.cell_type == "code")
    package = tmp_path / "edited_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = package / "tasks.py"
    v1 = '"""Tasks."""\n\n\ndef answer():\n    raise NotImplementedError("Task 0")\n'
    v2 = '"""Tasks."""\n\n\ndef answer():\n    value = 2  # the edit\n    return value\n'  # the body alone changes
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(s) for s in (
        setup,
        f"v2 = {v2!r}\nimport sys\nsys.path.insert(0, {str(tmp_path)!r})\nfrom pathlib import Path\n"
        f"Path({str(module)!r}).write_text({v1!r});\nfrom edited_package.tasks import answer\nimport inspect\n"
        "assert inspect.getsource(answer).startswith('def answer')",
        f"Path({str(module)!r}).write_text({v2!r});  # the student's edit, saved from the editor",
        "assert answer() == 2\nassert inspect.getsource(answer) == v2[v2.index('def'):], inspect.getsource(answer)",
    )]
    path = tmp_path / "edit.ipynb"
    nbformat.write(notebook, path)
    run_notebook(path, "smoke", timeout=120)


def test_every_notebook_starts_with_the_setup_cell_and_the_hw3_kernel():
    for path in list_notebooks():
        notebook = nbformat.read(path, as_version=4)
        first = next(c for c in notebook.cells if c.cell_type == "code")
        assert first.source.startswith("%load_ext autoreload\n%autoreload 2 --full\n"), path.name
        assert "setup_notebook()" in first.source, path.name
        assert notebook.metadata.kernelspec.name == "hw3", path.name
        assert all(not c.get("outputs") and not c.get("execution_count") for c in notebook.cells if c.cell_type
                   == "code"), f"{path.name} is committed with outputs"


def test_every_notebook_is_run_by_make_figures():
    makefile = (ROOT / "Makefile").read_text()
    # no names: runs all of notebooks/, or the tail of the sequence from FROM
    assert "course.run_notebooks --profile $(PROFILE)$(if $(FROM), --from $(FROM))\n" in makefile
    assert list_notebooks(), "notebooks/ is empty"


def test_from_restarts_the_sequence_at_a_notebook(monkeypatch, capsys):
    notebooks = list_notebooks()
    assert notebooks_from(notebooks[2].stem[:3]) == notebooks[2:]
    assert notebooks_from(notebooks[0].name) == notebooks
    ran = []
    monkeypatch.setattr(run_notebooks, "run_notebook", lambda path, profile, echo: ran.append(path) or 1.0)
    assert main(["--from", notebooks[-1].stem, "--profile", "smoke"]) == 0
    assert ran == notebooks[-1:]
    assert main(["--from", "no_such_notebook"]) == 2
    assert "matches 0 notebooks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--from", notebooks[0].stem, notebooks[1].stem])


@pytest.mark.slow
def test_runner_echoes_the_notebook_and_hides_the_transport_warning(tmp_path, capsys):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("# title"),
                      nbformat.v4.new_code_cell("import sys\nprint('hello from the notebook')\n"
                                                "print('a warning', file=sys.stderr)")]
    nbformat.write(notebook, tmp_path / "echo.ipynb")
    run_notebook(tmp_path / "echo.ipynb", "smoke", timeout=120, echo=True)
    out, err = capsys.readouterr()
    assert "-- cell 1/1" in out and "hello from the notebook" in out
    assert "a warning" in err and TRANSPORT_WARNING not in err + out


def test_pyproject_installs_the_packages_with_the_requirements():
    """`pip install -e .` gives the notebooks `common`, `fm` and `gm` with the dependencies of requirements.txt."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"] == ["common", "fm", "gm"]
    declared = project["project"]["dependencies"] + project["project"]["optional-dependencies"]["dev"]
    lines = [re.sub(r"\s*#.*", "", line) for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(declared) == sorted(line for line in lines if line)
    assert "torch==2.13.0" in declared


def test_times_table_keeps_other_rows_and_replaces_a_rerun(tmp_path):
    table = tmp_path / "times.md"
    first, second = (p.name for p in list_notebooks()[:2])
    run_notebooks.record_times(table, [(first, 10.0), (second, 20.0)])
    run_notebooks.record_times(table, [(second, 5.4)])
    assert run_notebooks.read_times(table) == {first: 10.0, second: 5.0}
    assert table.read_text().splitlines()[-1] == "| total | 15 |"
    assert json.loads(table.with_suffix(".json").read_text()) == {first: 10.0, second: 5.4, "total": 15.4}


def test_a_notebook_of_another_tree_stops_naming_both_trees(tmp_path):
    """A kernel registered by another checkout imports that checkout's package: the first cell stops and says so."""
    from common.notebook import TreeMismatchError, check_tree

    other = tmp_path / "student-hw3"
    (other / "common").mkdir(parents=True)
    (other / "common" / "__init__.py").write_text("")
    (other / "notebooks").mkdir()
    with pytest.raises(TreeMismatchError) as err:
        check_tree(other / "notebooks")
    assert str(other) in str(err.value) and str(ROOT) in str(err.value) and "make lab" in str(err.value)
    check_tree(ROOT / "notebooks")  # the notebook's own tree
    check_tree(tmp_path)  # a notebook outside any tree: nothing to compare
