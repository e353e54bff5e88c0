"""Every notebook runs end to end in the `smoke` profile (a few steps each), so a broken notebook fails CI; the
runner restarts a sequence, shows a notebook's own output and hides the kernel's transport warning."""

import json
import re
from pathlib import Path

import nbformat
import pytest

from common import run_notebooks
from common.run_notebooks import TRANSPORT_WARNING, list_notebooks, main, notebooks_from, run_notebook

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("path", list_notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_profile(path):
    seconds = run_notebook(path, profile="smoke", timeout=600)
    assert seconds > 0


def test_every_notebook_is_run_by_make_figures():
    makefile = (ROOT / "Makefile").read_text()
    # no names: runs all of notebooks/, or the tail of the sequence from FROM
    assert "common.run_notebooks --profile $(PROFILE)$(if $(FROM), --from $(FROM))\n" in makefile
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
