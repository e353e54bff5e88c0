"""`make grade-all` (`python -m course.grade_all`) on a generated class of 7 submissions, graded once per module
with 2 jobs (`graded_class`) on the tasks that their mistakes are in (`--tasks 1.1,1.3,2.1,2.3`): the two `make
submit` zips of tests/test_submit.py (the solution, only 1.1 done), typical wrong answers (two of them in different
tasks of one submission: each task is graded on its own), a hang in 2.1 beside a syntax error in 1.3 (with 1.1 and
2.3 done) and a zip with a path outside its folder (refused before any grading).

What a task's checks give a full solution, a fresh release, a crash or a wrong attention is tested task by task in
tests/test_course.py (every task); here the batch: its rows, statuses, summary, Gradescope results and re-runs.
Every task runs under a 20 s limit (the hang's cost; the solution's slowest task took 6 s on 2 loaded cores). The
class is 6 gradings of 4 sandboxed workers each, plus tests/test_submit.py's hand-ins, made once per session and
shared by both modules.
"""

import csv
import json
import os
import zipfile
from pathlib import Path

import pytest
from test_submit import shared_release, student_tree, submitted

from course.grade_all import MAX_FILES, RefusedZip, grade_all, safe_unzip
from course.gradebook import gradescope_results
from course.tasks import task_by_id

TIMEOUT = 20  # seconds per task: what the hang costs
GRADED = ["1.1", "1.3", "2.1", "2.3"]  # 1.2 and 2.2 hold no mistake of this class
FULL = {t: task_by_id(t).points for t in GRADED}
WRONG = {  # folder: (tasks pasted back, {task: {function: body}}), each a mistake students make
    "no-sqrt-d": (["1.1"], {"1.1": {"multi_head_self_attention": """
        weights = F.softmax(get_masked_attention(Q @ K.transpose(-2, -1), mask, attention_mask), dim=-1)
        out = attention_dropout(weights) @ V
        return (out, weights) if return_weights else out
    """}}),
    "mask-after-softmax-kl-sign": (["1.1", "2.1"], {"1.1": {"multi_head_self_attention": """
        weights = F.softmax(Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1]), dim=-1)
        weights = get_masked_attention(weights, mask, attention_mask).clamp(min=0)
        out = attention_dropout(weights) @ V
        return (out, weights) if return_weights else out
    """}, "2.1": {"kl_divergence": """
        per_dim = 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1.0)
        return -per_dim.flatten(1).sum(dim=1)
    """}}),
    "inf-fill-ddim-no-sigma": (["1.1", "2.3"], {"1.1": {"get_masked_attention": """
        allowed = mask.to(torch.bool)
        if attention_mask is not None:
            allowed = allowed & attention_mask.to(torch.bool)[:, None, None, :]
        return attention.masked_fill(~allowed, float("-inf"))
    """}, "2.3": {"ddim_update": """
        abar_prev = _bcast(self._abar_prev(t_prev), x0_hat.ndim)
        return abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps_hat
    """}}),
    "hang": (["1.1", "1.3", "2.1", "2.3"], {"1.3": {"dpo_loss": "return losses chosen_rewards\n"},
                                           "2.1": {"kl_divergence": "while True:\n    pass\n"}}),
}
WRONG_TASKS = {"no-sqrt-d": {"1.1"}, "mask-after-softmax-kl-sign": {"1.1", "2.1"},
               "inf-fill-ddim-no-sigma": {"1.1", "2.3"}}


def _escape_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fm/attention.py", "x = 1\n")
        zf.writestr("../../escaped.py", "import os\n")


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    hand_ins = submitted(tmp_path_factory)  # skips without the sandbox, before anything is built
    release = shared_release(tmp_path_factory)
    root = tmp_path_factory.mktemp("class")
    subs = root / "submissions"
    subs.mkdir()
    for path, _ in hand_ins.values():
        (subs / path.name).write_bytes(path.read_bytes())
    for name, (tasks, bodies) in WRONG.items():
        student_tree(release, subs / name, tasks, bodies)
    _escape_zip(subs / "submission-escape.zip")
    out = root / "grades"
    rows = grade_all(subs, out, jobs=2, tasks=[task_by_id(t) for t in GRADED], timeout=TIMEOUT, gradescope=True)
    return subs, out, {r.id: r for r in rows}


def _gradebook(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "gradebook.csv", newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


@pytest.mark.slow
def test_the_gradebook_has_the_expected_points_for_every_submission(graded_class):
    subs, out, rows = graded_class
    book = _gradebook(out)
    assert list(book) == sorted(book) and len(book) == 7
    assert list(next(iter(book.values()))) == ["id", *GRADED, "total", "status", "seconds", "reason"]

    def expect(sid: str, points: dict[str, float], status: str = "graded") -> None:
        row = book[sid]
        assert {t: float(row[t]) for t in GRADED} == {t: points.get(t, 0.0) for t in GRADED}, (sid, row)
        assert float(row["total"]) == sum(points.values()) and row["status"] == status, (sid, row)
        assert float(row["seconds"]) > 0, sid

    expect("solution", FULL)  # the `make submit` zip of the solution: every graded task full
    expect("only-1.1", {"1.1": 15})  # the `make submit` zip of a release with only 1.1 done
    # a hang costs its task only, and a syntax error the tasks that import its file (1.3: fm/dpo.py)
    expect("hang", {"1.1": 15, "2.3": 30}, "timeout")
    assert f"2.1: timed out after {TIMEOUT} s" in book["hang"]["reason"]
    dpo = json.loads((out / "hang" / "grade.json").read_text())["tasks"][GRADED.index("1.3")]
    assert dpo["status"] == "graded" and "SyntaxError" in json.dumps(dpo)
    for sid, tasks in WRONG_TASKS.items():  # partial or no credit on the tasks with a mistake, 0 elsewhere
        row = book[sid]
        assert row["status"] == "graded" and all(0 <= float(row[t]) < FULL[t] for t in tasks), (sid, row)
        assert all(float(row[t]) == 0 for t in GRADED if t not in tasks), (sid, row)
    assert float(book["no-sqrt-d"]["1.1"]) > 0  # the masking checks still pass
    escape = book["escape"]
    assert escape["status"] == "refused" and float(escape["total"]) == 0
    assert "'../../escaped.py' points outside" in escape["reason"]
    assert not list(subs.parent.rglob("escaped.py")) and not Path("/tmp/escaped.py").exists()
    for sid in book:  # every submission has its reports in OUT, none in the submissions' folder
        assert (out / sid / "grade.md").is_file() and json.loads((out / sid / "grade.json").read_text())
    assert not [*subs.glob("*/grade.*"), *subs.glob("grade*")]


@pytest.mark.slow
def test_the_summary_has_per_task_statistics_first_failures_and_the_failed_gradings(graded_class):
    _, out, rows = graded_class
    summary = (out / "summary.md").read_text()
    line = next(x for x in summary.splitlines() if x.startswith("| 1.1 "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    points = [rows[s].points["1.1"] for s in rows]
    assert cells[1] == "15" and float(cells[2]) == pytest.approx(sum(points) / len(points), abs=0.05)
    assert sum(int(c) for c in cells[4:]) == len(rows) == 7  # the histogram counts every submission
    assert int(cells[-1]) == sum(p == 15 for p in points) == 3  # "full": the solution, only-1.1 and hang
    assert not any(x.startswith(("| 1.2 ", "| 2.2 ")) for x in summary.splitlines())  # tasks not graded
    firsts = {x.split("**")[1]: x for x in summary.splitlines() if x.startswith("- **")}
    assert set(firsts) == set(GRADED) and "timeout (1)" in firsts["2.1"]  # the hang's first failure
    assert "Task" not in firsts["1.1"] and "reference check" in firsts["1.1"]  # check names, not messages
    assert "## Submissions that failed to grade" in summary
    assert "- `escape`: refused: zip refused" in summary and "- `hang`: timeout: 2.1: timed out" in summary


@pytest.mark.slow
def test_gradescope_results_and_a_rerun_that_grades_only_what_changed(graded_class):
    subs, out, rows = graded_class
    results = json.loads((out / "solution" / "results.json").read_text())
    assert results["score"] == sum(FULL.values()) and len(results["tests"]) == len(GRADED)
    assert [t["max_score"] for t in results["tests"]] == list(FULL.values())
    assert all(t["status"] == "passed" and {"name", "score", "max_score", "output"} <= set(t) for t in results["tests"])
    only = json.loads((out / "only-1.1" / "results.json").read_text())
    assert only["score"] == 15 and "Task 1.3: implement" in only["tests"][GRADED.index("1.3")]["output"]
    escape = json.loads((out / "escape" / "results.json").read_text())
    assert escape["score"] == 0 and "points outside" in escape["tests"][0]["output"]
    # a late submission (a zip with a symbolic link: refused without a grader process) and a re-run
    late = subs / "late.zip"
    with zipfile.ZipFile(late, "w") as zf:
        link = zipfile.ZipInfo("fm/dpo.py")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/work/main/fm/dpo.py")
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/grade.json")}
    tasks = [task_by_id(t) for t in GRADED]
    again = {r.id: r for r in grade_all(subs, out, jobs=2, tasks=tasks, timeout=TIMEOUT, gradescope=True)}
    assert [s for s, r in again.items() if not r.skipped] == ["late"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing graded again
    assert again["late"].status == "refused" and "symbolic link" in again["late"].reason
    assert [r.total for s, r in again.items() if s != "late"] == [r.total for r in rows.values()]
    assert len(_gradebook(out)) == 8
    late.unlink()


def test_safe_unzip_refuses_links_outside_paths_and_too_many_files_or_bytes(tmp_path):
    cases = {"outside": [("/etc/x.py", b"")], "dotdot": [("a/../../x.py", b"")], "many": [(f"{i}.py", b"")
             for i in range(6)], "big": [("fm/big.py", b"x" * 2000)]}
    for name, entries in cases.items():
        archive, dest = tmp_path / f"{name}.zip", tmp_path / name
        dest.mkdir()
        with zipfile.ZipFile(archive, "w") as zf:
            for entry, data in entries:
                zf.writestr(entry, data)
        with pytest.raises(RefusedZip):
            safe_unzip(archive, dest, max_files=5, max_bytes=1000)
    assert MAX_FILES >= 1000 and not (tmp_path / "x.py").exists() and not Path("/etc/x.py").exists()


def test_gradescope_results_follow_the_autograder_format():
    report = {"points": 7.5, "max_points": 25, "hidden_tests": True, "seconds": 3.0, "tasks": [
        {"id": "1.1", "title": "A", "points": 7.5, "max_points": 15, "note": "", "tests": [
            {"id": "c1", "outcome": "passed", "message": ""}, {"id": "c2", "outcome": "failed", "message": "off"}]},
        {"id": "2.1", "title": "B", "points": 0, "max_points": 10, "note": "timed out", "tests": []}]}
    results = gradescope_results(report)
    assert results["score"] == 7.5 and [t["max_score"] for t in results["tests"]] == [15, 10]
    assert results["tests"][0]["output"] == "- c2 (failed): off" and results["tests"][1]["output"] == "timed out"
    assert [t["status"] for t in results["tests"]] == ["failed", "failed"]
    json.dumps(results)  # plain JSON


def test_out_inside_the_submissions_is_refused(tmp_path):
    with pytest.raises(ValueError, match="inside SUBMISSIONS"):
        grade_all(tmp_path, tmp_path / "grades", sandbox="none")
    assert not (tmp_path / "grades").exists() and os.listdir(tmp_path) == []
