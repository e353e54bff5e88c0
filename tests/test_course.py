"""Course tooling: solution regions, the student release and the autograder, on this very tree.

The grading tests run the worker in the bubblewrap sandbox once per graded task (about 2-6 s each); they skip when
`bwrap` is missing, unless HW3_REQUIRE_SANDBOX is set (as `.ci/run` does), where they fail instead.
"""

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from course.audit import find_leaks
from course.grade import escape, grade, write_reports
from course.regions import PRIVATE_SOURCES, RegionError, find_regions, scan_tree, strip_regions
from course.release import build_release, check_regions
from course.sandbox import INSTALL, SandboxUnavailable, check_available
from course.tasks import TASKS, task_by_id

ROOT = Path(__file__).resolve().parent.parent
IMPORT_CHECK = "import fm.attention, fm.sft, fm.dpo, gm.loss, gm.model, gm.diffusion"


def _stub(task_id: str, function: str) -> str:
    return f"Task {task_id}: implement {function} (see its docstring and {task_by_id(task_id).notebook})"


# ---------------------------------------------------------------------------------------------- regions
SAMPLE = '''def kl_divergence(mean, logvar):
    """The docstring stays."""
    if mean is None:
        raise ValueError("input validation stays")
    ### BEGIN SOLUTION
    per_dim = mean + logvar
    return per_dim
    ### END SOLUTION
'''


def test_a_region_becomes_a_raise_naming_the_task_and_keeps_signature_docstring_and_checks():
    stripped, (region,) = strip_regions(SAMPLE, "gm/loss.py")
    assert (region.function, region.task.id, region.begin, region.end) == ("kl_divergence", "2.1", 5, 8)
    assert "per_dim" not in stripped and "BEGIN SOLUTION" not in stripped
    assert stripped.startswith('def kl_divergence(mean, logvar):\n    """The docstring stays."""\n    if mean is None:')
    assert f'    # YOUR CODE HERE\n    raise NotImplementedError("{_stub("2.1", "kl_divergence")}")\n' in stripped
    namespace = {}
    exec(stripped, namespace)
    with pytest.raises(NotImplementedError, match=r"^Task 2\.1: implement kl_divergence \(see its docstring"):
        namespace["kl_divergence"](1, 2)
    with pytest.raises(ValueError, match="input validation stays"):
        namespace["kl_divergence"](None, 2)


def test_a_long_stub_is_wrapped_to_the_line_length():
    source = "class GaussianDiffusion:\n    def q_posterior(self):\n" + " " * 8 + "### BEGIN SOLUTION\n"
    source += " " * 8 + "return 1\n" + " " * 8 + "### END SOLUTION\n"
    stripped, _ = strip_regions(source, "gm/diffusion.py")
    assert max(len(line) for line in stripped.splitlines()) <= 120
    ast.parse(stripped)


def _function(body: str, name: str = "dpo_loss") -> str:
    return f"def {name}(x):\n" + textwrap.indent(textwrap.dedent(body), "    ")


@pytest.mark.parametrize(
    "source, match",
    [
        (_function("### BEGIN SOLUTION\nreturn x\n"), "never closed"),
        (_function("return x\n### END SOLUTION\n"), "without a"),
        (_function("### BEGIN SOLUTION\n### BEGIN SOLUTION\nreturn x\n### END SOLUTION\n"), "do not nest"),
        (_function("## BEGIN SOLUTION\nreturn x\n### END SOLUTION\n"), "malformed solution marker"),
        (_function("### BEGIN SOLUTION\nreturn x\n") + "### END SOLUTION\n", "indented differently"),
        ("### BEGIN SOLUTION\nX = 1\n### END SOLUTION\n", "outside any function"),
        (_function("### BEGIN SOLUTION\nreturn x\n### END SOLUTION\n", name="helper"), "no task lists 'helper'"),
        (_function("y = (1 +\n### BEGIN SOLUTION\n2)\n### END SOLUTION\nreturn y\n"), "leaves invalid Python"),
    ],
    ids=["unclosed", "end-without-begin", "nested", "misspelt", "end-indent", "module-level", "unmapped", "cut"],
)
def test_malformed_regions_fail_loudly_with_file_and_line(source, match):
    with pytest.raises(RegionError, match=match) as err:
        strip_regions(source, "fm/dpo.py")
    assert str(err.value).startswith("fm/dpo.py:")


def test_every_task_has_its_regions_in_this_tree():
    regions = check_regions(ROOT)  # raises if a function of the table holds no region, or a region maps to no task
    for task in TASKS:
        assert {r.function for r in regions if r.task is task} == set(task.functions), task.id


def test_the_readme_names_every_function_a_student_writes():
    readme = (ROOT / "README.md").read_text()
    assert "## For instructors" in readme and "## For students" in readme
    students = readme.split("## For students", 1)[1]
    for region in check_regions(ROOT):
        assert f"{region.function}`" in students and region.path in students, region.function


# ---------------------------------------------------------------------------------------------- release
@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return build_release(tmp_path_factory.mktemp("dist") / "student", check_imports=False).out


def test_release_has_the_students_files_only_and_no_solution(release):
    assert not scan_tree(release), "solution markers left in the release"
    for region in check_regions(ROOT):
        assert _stub(region.task.id, region.function) in (release / region.path).read_text()
    for path in ("README.md", "report.md", "Makefile", "pyproject.toml", "requirements.txt", "course/grade.py",
                 "course/worker.py", "course/sandbox.py", "grading/task_1_1.py", "tests/test_model.py",
                 "notebooks/1_1_attention.ipynb"):
        assert (release / path).is_file(), path
    for path in ("fig", "grading/hidden", "tests/test_course.py", "tests/test_report.py", ".venv", "checkpoints",
                 "notebooks/0_theory.ipynb", "tests/test_theory.py", "tests/test_attention.py",
                 "tests/test_diffusion.py", *PRIVATE_SOURCES):
        assert not (release / path).exists(), path
    assert len(list((release / "grading" / "references").glob("*.safetensors"))) > 30  # the preview's references
    assert (release / "report.md").read_text() == (ROOT / "course/report_template.md").read_text()
    assert "e-07" not in (release / "report.md").read_text()  # the template has no results
    readme = (release / "README.md").read_text()
    assert "| 1.1 Multi-head self-attention | `get_masked_attention`, `multi_head_self_attention` |" in readme
    for notebook in (release / "notebooks").glob("*.ipynb"):
        cells = [c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
        assert cells and all(c.outputs == [] and c.execution_count is None for c in cells), notebook.name


def _signature_and_docstring(text: str, function: str) -> tuple[str, str | None]:
    functions = (n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    node = next(n for n in functions if n.name == function)
    return ast.unparse(node.args), ast.get_docstring(node)


def test_release_keeps_signatures_and_docstrings(release):
    for region in check_regions(ROOT):
        ours = _signature_and_docstring((ROOT / region.path).read_text(), region.function)
        assert _signature_and_docstring((release / region.path).read_text(), region.function) == ours
        assert ours[1], f"{region.function} has no docstring to guide the student"


def test_release_imports_cleanly(release):
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=release, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(release), "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr


def test_release_tests_collect(release):
    """A student's `make test` in the release collects every shipped test module (none imports a private one)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=release, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(release), "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = {m.group(1) for m in re.finditer(r"^(tests/test_\w+\.py)(?:::|: \d+$)", proc.stdout, re.MULTILINE)}
    shipped = {f"tests/{p.name}" for p in (release / "tests").glob("test_*.py")}
    assert collected == shipped and "tests/test_notebooks.py" in shipped


RUN_CELLS = """
import json, sys
import nbformat
from IPython.core.interactiveshell import InteractiveShell
cells = [c for c in nbformat.read(sys.argv[1], as_version=4).cells if c.cell_type == "code"]
shell = InteractiveShell.instance()  # the notebooks' first cell uses IPython magics (autoreload)
for index, cell in enumerate(cells):
    err = shell.run_cell(cell.source, silent=True).error_in_exec
    if err is not None:
        print(json.dumps({"cell": index, "of": len(cells), "error": type(err).__name__, "message": str(err)}))
        break
"""


@pytest.mark.slow
def test_notebook_stops_at_the_first_unimplemented_function_naming_the_task(release):
    """The 1.1 notebook's cells run in order, as a kernel would, until the first call of a stub."""
    notebooks = release / "notebooks"
    env = {**os.environ, "HW3_PROFILE": "smoke", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(release)}
    proc = subprocess.run([sys.executable, "-c", RUN_CELLS, "1_1_attention.ipynb"], cwd=notebooks,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    stop = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stop["error"] == "NotImplementedError" and 0 < stop["cell"] < stop["of"], stop
    assert stop["message"] == _stub("1.1", "multi_head_self_attention")


# ---------------------------------------------------------------------------------------------- leak audit
def test_the_release_has_no_leak_and_a_copied_region_is_caught(release, tmp_path):
    regions = check_regions(ROOT)
    assert find_leaks(release, regions, ROOT) == []
    dpo = next(r for r in regions if r.function == "dpo_loss")
    body = (ROOT / dpo.path).read_text().splitlines()[dpo.begin : dpo.end - 1]
    leaky = tmp_path / "leaky"
    (leaky / "notes").mkdir(parents=True)
    (leaky / "notes" / "hint.md").write_text("A hint:\n\n```python\n" + "\n".join(body[1:3]) + "\n```\n")
    (leaky / "other.py").write_text("x = 1\n" + body[0] + "\n")  # one line alone is no leak
    (leak,) = find_leaks(leaky, regions, ROOT)
    assert leak.file == "notes/hint.md" and leak.region.function == "dpo_loss"
    assert "dpo_loss" in str(leak) and "notes/hint.md" in str(leak)


def test_make_student_refuses_a_release_that_leaks(tmp_path):
    tree = tmp_path / "tree"
    for part in ("common", "fm", "gm", "notebooks", "tests", "grading", "course", "report"):
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("__pycache__", "*.png"))
    for name in ("Makefile", "requirements.txt", "requirements-offline.txt", "pyproject.toml", ".gitignore"):
        shutil.copyfile(ROOT / name, tree / name)
    sft = next(r for r in check_regions(ROOT) if r.function == "sft_loss")
    body = (ROOT / sft.path).read_text().splitlines()[sft.begin : sft.end - 1]
    (tree / "course" / "README_STUDENT.md").write_text((tree / "course" / "README_STUDENT.md").read_text()
                                                        + "\n" + "\n".join(body) + "\n")
    with pytest.raises(RegionError, match=r"README\.md:\d+ repeats two lines of the solution of sft_loss"):
        build_release(tmp_path / "dist" / "student", root=tree, check_imports=False)
    assert not (tmp_path / "dist" / "student").exists()


# ---------------------------------------------------------------------------------------------- grader
def require_sandbox() -> None:
    """Skip without bubblewrap, with the command that installs it; fail instead where CI requires the sandbox."""
    try:
        check_available("bwrap")
    except SandboxUnavailable as err:
        if os.environ.get("HW3_REQUIRE_SANDBOX"):
            pytest.fail(f"HW3_REQUIRE_SANDBOX is set but the sandbox cannot run: {err}")
        pytest.skip(f"no sandbox: {err}")


@pytest.fixture
def sandbox() -> None:
    require_sandbox()


def submission_copy(release: Path, tmp_path: Path) -> Path:
    """A copy of the release to edit as a student would."""
    return Path(shutil.copytree(release, tmp_path / "submission"))


def paste(submission: Path, task_id: str, bodies: dict[str, str] | None = None) -> None:
    """Put back the solution's region bodies of `task_id` (or, per function, the given `bodies`) in place of the
    release's stubs, as a student would write them."""
    for path in sorted({r.path for r in check_regions(ROOT) if r.task.id == task_id}):
        lines = (ROOT / path).read_text().splitlines(keepends=True)
        text = (submission / path).read_text()
        for region in find_regions("".join(lines), path):
            if region.task.id != task_id:
                continue
            body = "".join(lines[region.begin : region.end - 1])
            if bodies and region.function in bodies:
                body = textwrap.indent(textwrap.dedent(bodies[region.function]), region.indent)
            stub = "".join(region.stub())
            assert text.count(stub) == 1, (path, region.function)
            text = text.replace(stub, body)
        (submission / path).write_text(text)


def _by_id(result) -> dict:
    return {t.id: t for t in result.tasks}


@pytest.mark.slow
def test_the_solution_grades_full_marks(sandbox, tmp_path):
    result = grade(ROOT, jobs=2)
    json_path, md_path = write_reports(result, tmp_path)
    report = json.loads(json_path.read_text())
    assert report["percent"] == 100.0 and report["points"] == report["max_points"] == 100
    assert report["hidden_tests"] is True and report["sandbox"] == "bwrap"
    assert [t["id"] for t in report["tasks"]] == [t.id for t in TASKS]
    for task in report["tasks"]:
        assert task["status"] == "graded" and task["passed"] == task["total"] > 0, task
        assert any(t["id"].startswith("hidden: ") for t in task["tests"]), task["id"]
    markdown = md_path.read_text()
    assert "**100 / 100 points (100 %)**" in markdown and "Failed checks" not in markdown


@pytest.mark.slow
def test_pasting_back_only_the_1_1_solution_grades_1_1_full_and_every_fresh_task_zero(sandbox, release, tmp_path):
    """A release with only 1.1 done: 1.1 full; every other task as released gets 0, and the grade lists each of its
    failed checks (not only the first) with the stub's message naming the task."""
    submission = submission_copy(release, tmp_path)
    paste(submission, "1.1")
    result = grade(submission, jobs=2)
    tasks, markdown = _by_id(result), result.to_markdown()
    assert tasks["1.1"].passed == tasks["1.1"].total and tasks["1.1"].points == 15 == result.points
    for task in (t for t in result.tasks if t.id != "1.1"):
        assert task.status == "graded" and task.passed == 0 and task.total > 0 and task.points == 0, task.id
        assert all(f"Task {task.id}: implement" in t.message for t in task.tests), task.id
        assert markdown.count(f"- **{task.id}**") == task.total  # every failed check, not only the first


WRONG_ATTENTION = {
    "no 1/sqrt(d) scaling": """
        weights = F.softmax(get_masked_attention(Q @ K.transpose(-2, -1), mask, attention_mask), dim=-1)
        out = attention_dropout(weights) @ V
        return (out, weights) if return_weights else out
    """,
    "no return_weights (the homework's block)": """
        weights = F.softmax(get_masked_attention(Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1]), mask,
                                                 attention_mask), dim=-1)
        return attention_dropout(weights) @ V
    """,
    "a stub returning V": "return V\n",
}


@pytest.mark.slow
def test_wrong_attentions_get_messages_a_student_can_act_on(sandbox, release, tmp_path):
    messages = {}
    for index, (mistake, body) in enumerate(WRONG_ATTENTION.items()):
        submission = submission_copy(release, tmp_path / str(index))
        paste(submission, "1.1", {"multi_head_self_attention": body})
        (task,) = grade(submission, [task_by_id("1.1")]).tasks
        messages[mistake] = task
    unscaled = messages["no 1/sqrt(d) scaling"]
    assert 0 < unscaled.passed < unscaled.total and unscaled.points > 0
    first = unscaled.failures[0]
    assert first.id == "reference check (all-ones mask)"
    assert "largest absolute error" in first.message and "at index (0, 0, " in first.message, first.message
    no_weights = messages["no return_weights (the homework's block)"]
    (failure,) = no_weights.failures
    assert "return_weights=True must return (out, weights)" in failure.message
    assert "expected a tensor of shape (3, 2, 6, 4) float32" in failure.message, failure.message
    stub = messages["a stub returning V"]
    assert stub.stub and stub.points == 0 and "returns its input `V` unchanged" in stub.failures[0].message


@pytest.mark.slow
def test_a_hang_a_crash_and_a_syntax_error_get_zero_and_grading_goes_on(sandbox, release, tmp_path):
    submission = submission_copy(release, tmp_path)
    paste(submission, "2.1", {"kl_divergence": "while True:\n    pass\n"})  # never returns
    paste(submission, "2.2", {"d_hinge_loss": "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"})
    paste(submission, "1.3", {"dpo_loss": "return losses chosen_rewards\n"})
    hang_fast = dataclasses.replace(task_by_id("2.1"), timeout=8)  # the table's limit is 120 s
    hang, crash, broken = grade(submission, [hang_fast, task_by_id("2.2"), task_by_id("1.3")]).tasks
    assert hang.status == "timeout" and hang.points == 0 and "timed out after 8 s" in hang.note
    assert hang.tests[0].outcome == "not run" and "during this check" in hang.tests[0].message
    assert crash.status == "crashed" and crash.points == 0 and "SIGSEGV" in crash.note
    assert "gm/loss.py" in crash.note and "d_hinge_loss" in crash.note, crash.note
    assert broken.status == "graded" and broken.passed == 0 and broken.total > 0
    message = broken.failures[0].message
    assert message.startswith("raised SyntaxError") and "fm/dpo.py" in message, message


@pytest.mark.slow
def test_make_grade_in_a_student_tree_previews_with_the_shipped_references(sandbox, release, tmp_path):
    """The release's own grader (what a student's `make grade TASKS=1.1` runs): public checks only, judged against
    the references that `make student` shipped."""
    submission = submission_copy(release, tmp_path)
    paste(submission, "1.1")
    out = tmp_path / "grade"
    venv = ROOT / ".venv"  # `-o`: make takes it as installed (the release's requirements files are newer copies)
    command = ["make", "-o", f"{venv}/.installed", "grade", "TASKS=1.1", f"GRADE_OUT={out}", f"VENV={venv}"]
    proc = subprocess.run(command, cwd=submission, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(submission)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "grade.json").read_text())
    assert report["hidden_tests"] is False and report["points"] == report["max_points"] == 15
    (task,) = report["tasks"]
    assert task["total"] > 0 and not any(t["id"].startswith("hidden") for t in task["tests"])
    assert "a preview of the grade" in (out / "grade.md").read_text() and "| 1.1 " in proc.stdout


def test_report_text_is_escaped_and_written_atomically_outside_the_submission(tmp_path):
    from course.grade import Grade, GradedTest, TaskGrade

    evil = "<script>alert(1)</script> | **bold** [link](http://x)"
    task = TaskGrade("1.1", "t", 15, "graded", 1.0, [GradedTest("check", "failed", f"raised ValueError: {evil}")])
    result = Grade(str(tmp_path / "sub"), True, "none", 1.0, [task])
    markdown = result.to_markdown()
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown and "\\*\\*bold" in markdown
    assert "\\| \\*\\*" in markdown and "without a sandbox (--sandbox none)" in markdown
    assert escape("a\nb") == "a b"
    (tmp_path / "sub" / "fm").mkdir(parents=True)
    with pytest.raises(ValueError, match="inside the graded submission"):
        write_reports(result, tmp_path / "sub" / "grades")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="symbolic link"):
        write_reports(result, tmp_path / "link")
    out = tmp_path / "out"
    out.mkdir()
    (out / "grade.json").symlink_to(tmp_path / "elsewhere" / "target.json")  # replaced, never followed
    json_path, _ = write_reports(result, out)
    assert not json_path.is_symlink() and not (tmp_path / "elsewhere" / "target.json").exists()
    assert json.loads(json_path.read_text())["tasks"][0]["tests"][0]["message"].endswith(evil)


def test_a_missing_sandbox_stops_grading_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        grade(ROOT, [task_by_id("1.1")])
    assert "apt-get install bubblewrap" in INSTALL
    with pytest.raises(SandboxUnavailable, match="docker is not supported"):
        check_available("docker")


def test_grading_a_folder_that_is_not_a_hw3_tree_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a hw3 tree"):
        grade(tmp_path)
