"""`make submit` (`python -m course.submit`) in a student release: the preview grade, the executed notebooks, the
report and one zip with its manifest.

Two hand-ins, made once per test session (`submitted`, shared with tests/test_grade_all.py, which grades them; the
release `shared_release` also with tests/test_browser.py): the solution pasted back into a fresh release, and a
release with only task 1.1 done. Each runs the release's own
`python -m course.submit` as `make submit` does (the preview grade: 6 sandboxed workers; notebooks 1_1, and 2_1
which stops at the first 2.1 function in the 1.1-only release). About 70 s in all on 2 shared cores.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
from test_course import ROOT, paste, require_sandbox

from course.grade_all import safe_unzip
from course.release import RELEASE_INFO, build_release
from course.tasks import TASKS

_SHARED: dict[str, object] = {}  # built once per session, whichever of the two modules asks first


def shared_release(tmp_path_factory) -> Path:
    """One fresh student release for the session (without its import check: no sandbox needed to build it). Do not
    edit it in place: copy it (`student_tree`)."""
    if "release" not in _SHARED:
        _SHARED["release"] = build_release(tmp_path_factory.mktemp("dist") / "student", check_imports=False).out
    return _SHARED["release"]


def student_tree(release: Path, where: Path, tasks: list[str], bodies: dict[str, dict[str, str]] | None = None
                 ) -> Path:
    """A copy of `release` at `where` with the solution of `tasks` pasted back (or, per task, the given bodies)."""
    shutil.copytree(release, where)
    for task_id in tasks:
        paste(where, task_id, (bodies or {}).get(task_id))
    return where


def run_submit(tree: Path, student: str, notebooks: str) -> subprocess.CompletedProcess:
    """The release's own `python -m course.submit` in `tree`, as `make submit` runs it (its figures in its fig/)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HW3_FIG_DIR", "HW3_CKPT_DIR")}
    env |= {"PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "course.submit", "--id", student, "--notebooks", notebooks],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=900)


def submitted(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """{"solution": (zip, process), "only-1.1": (zip, process)}, made once per session."""
    if "zips" not in _SHARED:
        require_sandbox()
        release = shared_release(tmp_path_factory)
        root = tmp_path_factory.mktemp("submit")
        zips = {}
        for student, tasks, notebooks in (("solution", [t.id for t in TASKS], "1_1"),
                                          ("only-1.1", ["1.1"], "1_1,2_1")):
            tree = student_tree(release, root / student, tasks)
            proc = run_submit(tree, student, notebooks)
            zips[student] = (tree / f"submission-{student}.zip", proc)
        _SHARED["zips"] = zips
    return _SHARED["zips"]


@pytest.fixture(scope="module")
def hand_ins(tmp_path_factory):
    return submitted(tmp_path_factory)


def _manifest(path: Path) -> tuple[dict, dict[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    return json.loads(files.pop("manifest.json")), files


@pytest.mark.slow
def test_the_solutions_hand_in_is_complete_with_its_preview_grade_and_every_file_hashed(hand_ins):
    path, proc = hand_ins["solution"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "**100 / 100 points (100 %)**" in proc.stdout and "a preview of the grade" in proc.stdout
    assert f"wrote {path}" in proc.stdout and "complete: hand in this zip" in proc.stdout
    manifest, files = _manifest(path)
    assert manifest["complete"] is True and manifest["problems"] == [] and manifest["id"] == "solution"
    assert manifest["preview_grade"]["points"] == 100 and manifest["preview_grade"]["hidden_tests"] is False
    release = json.loads((path.parent / RELEASE_INFO).read_text())
    assert manifest["release"] == release and release["version"] and manifest["profile"] == "smoke"
    assert manifest["date"].endswith("+00:00")
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == set(files)  # every file but the manifest, each with its hash and size
    for name, data in files.items():
        assert listed[name]["sha256"] == hashlib.sha256(data).hexdigest() and listed[name]["bytes"] == len(data)
    assert {"fm/attention.py", "gm/diffusion.py", "common/__init__.py", "report.md", "fig/attention_errors.md",
            "notebooks/1_1_attention.ipynb"} <= set(files)
    assert not [n for n in files if n.startswith(("tests/", "grading/", "course/", ".venv"))]
    assert files["fm/attention.py"] == (path.parent / "fm" / "attention.py").read_bytes()
    executed = nbformat.reads(files["notebooks/1_1_attention.ipynb"].decode(), as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code) and any(c.outputs for c in code)
    own = nbformat.read(path.parent / "notebooks" / "1_1_attention.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in own.cells)  # the student's own notebook stays without outputs
    assert manifest["notebooks"] == [{"name": "1_1_attention.ipynb", "ok": True,
                                      "seconds": manifest["notebooks"][0]["seconds"], "error": ""}]


@pytest.mark.slow
def test_a_failing_notebook_is_named_with_its_cell_and_the_zip_is_written_marked_incomplete(hand_ins):
    path, proc = hand_ins["only-1.1"]
    assert proc.returncode == 1 and path.is_file(), proc.stderr[-2000:]
    manifest, files = _manifest(path)
    assert manifest["complete"] is False
    assert manifest["preview_grade"]["points"] == 15 and manifest["preview_grade"]["tasks"]["1.1"] == 15
    ok, failed = manifest["notebooks"]
    assert ok["ok"] and not failed["ok"] and failed["name"] == "2_1_vae.ipynb"
    assert failed["error"].startswith("failed in cell ") and "Task 2.1: implement kl_divergence" in failed["error"]
    (problem,) = manifest["problems"]
    assert problem.startswith("notebook 2_1_vae.ipynb failed in cell ") and "INCOMPLETE" in proc.stderr
    executed = nbformat.reads(files["notebooks/2_1_vae.ipynb"].decode(), as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors and errors[0].ename == "NotImplementedError"  # saved up to the failing cell, with its error


def test_a_report_directive_is_filled_from_the_students_fig_and_a_broken_one_is_a_problem(tmp_path):
    from course.submit import render_report

    (tmp_path / "fig").mkdir()
    (tmp_path / "fig" / "m.json").write_text('{"loss": 0.12345}')
    (tmp_path / "report.md").write_text("# Report\n\nloss {{ value: fig/m.json | loss | .3f }}\n")
    assert render_report(tmp_path) == ("# Report\n\nloss 0.123\n", "")
    (tmp_path / "report.md").write_text("loss {{ value: fig/missing.json | loss }}\n")
    text, problem = render_report(tmp_path)
    assert text == "loss {{ value: fig/missing.json | loss }}\n" and "fig/missing.json" in problem


def test_the_release_ships_what_make_submit_needs():
    release = (ROOT / "course" / "release.py").read_text()
    assert "RELEASE_INFO" in release
    makefile = (ROOT / "Makefile").read_text()
    assert "python -m course.submit" in makefile.replace("$(PY)", "python") and "submit:" in makefile
    readme = (ROOT / "course" / "README_STUDENT.md").read_text()
    handing_in = readme.split("## Handing in", 1)[1].split("\n## ", 1)[0]
    for what in ("make submit ID=", "submission-<your id>.zip", "hidden checks", "graded by hand", "table above",
                 "marked incomplete"):
        assert what in handing_in, what
    assert "make lab" in readme and '"hw3"' in readme


def test_safe_unzip_takes_a_submit_zip_with_its_tree_at_the_top_or_in_one_folder(tmp_path):
    for index, prefix in enumerate(("", "alice/")):
        archive = tmp_path / f"{index}.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr(f"{prefix}fm/attention.py", "x = 1\n")
            zf.writestr(f"{prefix}manifest.json", "{}")
        dest = tmp_path / f"u{index}"
        dest.mkdir()
        tree = safe_unzip(archive, dest)
        assert (tree / "fm" / "attention.py").read_text() == "x = 1\n"
