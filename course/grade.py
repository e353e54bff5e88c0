"""Autograder: `python -m course.grade [SUBMISSION] [--out DIR] [--tasks 1.1,2.3] [--timeout S]` (`make grade`).

A submission is a hw3 tree (default: this one). Its tests are never used: the grader builds a temporary tree from
its own copy of the package with every solution region cut out (so a file missing from the submission is a stub,
never the solution), lays the submission's Python files of common/, fm/ and gm/ over it, adds its own graded tests
(`grading/`, and `grading/hidden/` where this tree has it) and runs each task's tests with pytest in a subprocess
under a time limit. A task whose run hangs or crashes gets 0 points with the reason; the others are still graded.

Prints grade.md and writes grade.json and grade.md to --out: per task, tests passed / total, points (the task's
points of `course.tasks`, split evenly over its graded tests) and the first failure's message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from course.regions import PACKAGES, RegionError, source_files, strip_regions
from course.tasks import TASKS, Task, task_by_id

ROOT = Path(__file__).resolve().parent.parent
GRADING = "grading"
PYTEST_INI = "grading/pytest.ini"
MESSAGE_CHARS = 300  # of a failure message kept in the reports
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class GradedTest:
    id: str  # pytest node id, e.g. "grading/test_task_1_1.py::test_reference_check[all-ones mask]"
    outcome: str  # passed | failed | error | skipped | not run
    message: str = ""


@dataclass
class TaskGrade:
    id: str
    title: str
    max_points: int
    status: str  # graded | timeout | crashed
    seconds: float
    tests: list[GradedTest]
    note: str = ""  # why a timed-out or crashed run has no results

    @property
    def passed(self) -> int:
        return sum(t.outcome == "passed" for t in self.tests)

    @property
    def total(self) -> int:
        return len(self.tests)

    @property
    def points(self) -> float:
        return round(self.max_points * self.passed / self.total, 2) if self.total else 0.0

    @property
    def first_failure(self) -> GradedTest | None:
        return next((t for t in self.tests if t.outcome != "passed"), None)


@dataclass
class Grade:
    submission: str
    hidden_tests: bool  # whether this grader has (and ran) the hidden tests
    seconds: float
    tasks: list[TaskGrade] = field(default_factory=list)

    @property
    def points(self) -> float:
        return round(sum(t.points for t in self.tasks), 2)

    @property
    def max_points(self) -> int:
        return sum(t.max_points for t in self.tasks)

    def to_json(self) -> dict:
        tasks = []
        for t in self.tasks:
            failure = t.first_failure
            tasks.append({
                "id": t.id, "title": t.title, "status": t.status, "passed": t.passed, "total": t.total,
                "points": t.points, "max_points": t.max_points, "seconds": round(t.seconds, 1), "note": t.note,
                "first_failure": asdict(failure) if failure else None, "tests": [asdict(r) for r in t.tests],
            })
        return {"submission": self.submission, "points": self.points, "max_points": self.max_points,
                "percent": round(100 * self.points / self.max_points, 1) if self.max_points else 0.0,
                "hidden_tests": self.hidden_tests, "seconds": round(self.seconds, 1), "tasks": tasks}

    def to_markdown(self) -> str:
        percent = self.to_json()["percent"]
        tests = ("public and hidden graded tests" if self.hidden_tests
                 else "public graded tests only (this tree has no grading/hidden/: a preview of the grade)")
        lines = [f"# Grade of `{self.submission}`", "",
                 f"**{self.points:g} / {self.max_points} points ({percent:g} %)**; {tests}; "
                 f"{self.seconds:.0f} s.", "",
                 "| task | tests passed | points | time (s) | first failure |", "|---|---|---|---|---|"]
        for t in self.tasks:
            failure = t.first_failure
            why = t.note or (f"`{failure.id.split('::', 1)[-1]}`: {failure.message}" if failure else "")
            lines.append(f"| {t.id} {t.title} | {t.passed} / {t.total} | {t.points:g} / {t.max_points} | "
                         f"{t.seconds:.1f} | {_cell(why)} |")
        return "\n".join(lines) + "\n"


def grade(submission: Path, tasks: list[Task] | None = None, timeout: float | None = None, root: Path = ROOT,
          jobs: int = 1, keep: bool = False) -> Grade:
    """Grade the hw3 tree at `submission` on `tasks` (default: all) with the grader's tree at `root`.

    timeout: seconds per task (default: each task's own). jobs: tasks run at the same time. keep: leave the
    temporary tree (its path is printed).
    """
    submission, root = submission.resolve(), root.resolve()
    if not any((submission / p).is_dir() for p in PACKAGES):
        raise ValueError(f"{submission} is not a hw3 tree: it has none of {', '.join(p + '/' for p in PACKAGES)}")
    tasks = list(TASKS) if tasks is None else tasks
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="hw3-grade-"))
    try:
        _grader_tree(root, work)
        files = {t.id: _test_files(t, work) for t in tasks}
        expected = _collect(root, work, tuple(f for fs in files.values() for f in fs))
        _overlay(submission, work)
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            results = list(pool.map(lambda t: _run_task(t, files[t.id], expected, work, timeout or t.timeout), tasks))
    finally:
        if keep:
            print(f"course.grade: kept the grading tree {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    hidden = any(h for t in tasks for h in t.hidden) and all((root / h).exists() for t in tasks for h in t.hidden)
    return Grade(str(submission), hidden, time.perf_counter() - start, results)


def _grader_tree(root: Path, work: Path) -> None:
    """The grader's package with its solution regions cut out, and its graded tests."""
    for package in PACKAGES:
        for src in sorted((root / package).rglob("*")):
            if src.is_dir() or "__pycache__" in src.parts:
                continue
            rel = src.relative_to(root).as_posix()
            dst = work / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix == ".py":
                dst.write_text(strip_regions(src.read_text(), rel)[0])
            else:
                shutil.copyfile(src, dst)
    shutil.copytree(root / GRADING, work / GRADING, ignore=shutil.ignore_patterns("__pycache__"))


def _test_files(task: Task, work: Path) -> list[str]:
    missing = [f for f in task.tests if not (work / f).exists()]
    if missing:
        raise FileNotFoundError(f"task {task.id}: graded test file(s) {missing} missing from the grader's tree")
    return [*task.tests, *(h for h in task.hidden if (work / h).exists())]


def _overlay(submission: Path, work: Path) -> None:
    """Copy the submission's Python files of PACKAGES over the grader's; nothing else of the submission is used,
    and symbolic links are skipped (a submission's code is its own files)."""
    for src in source_files(submission):
        if src.is_symlink():
            continue
        dst = work / src.relative_to(submission)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())


def _env(work: Path) -> dict[str, str]:
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1", "HW3_PROFILE": "smoke"}
    env.pop("PYTEST_ADDOPTS", None)  # the grader's options only
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads starve a small CPU
    for name, sub in (("HW3_FIG_DIR", "fig"), ("HW3_CKPT_DIR", "checkpoints"), ("HW3_CACHE_DIR", "cache")):
        env[name] = str(work / "outputs" / sub)
    return env


def _pytest(work: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", str(work / PYTEST_INI),
            "--rootdir", str(work), *args]


def _collect(root: Path, work: Path, files: tuple[str, ...]) -> list[str]:
    """Node ids of the graded tests in `files`, in order, collected on the grader's own (stubbed) tree `work`
    before the submission is laid over it: what a submission is graded on never depends on its code."""
    key = (str(root), files, _fingerprint(root))
    if key not in _COLLECTED:
        proc = subprocess.run(_pytest(work, "--collect-only", "-q", *files), cwd=work, env=_env(work),
                              capture_output=True, text=True)
        ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
        if proc.returncode or not ids:
            raise RuntimeError(f"the grader's own tests do not collect:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
        _COLLECTED[key] = ids
    return _COLLECTED[key]


_COLLECTED: dict[tuple, list[str]] = {}  # one collection per grader tree and process (tests grade many trees)


def _fingerprint(root: Path) -> str:
    """Hash of what the collection depends on: the graded tests and the grader's package sources."""
    digest = hashlib.sha1()
    for path in sorted([*(root / GRADING).rglob("*.py"), *source_files(root)]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _junit_key(node_id: str) -> tuple[str, str]:
    """(classname, name) that pytest's junit report gives the test `node_id`."""
    path, bracket, params = node_id.partition("[")
    names = path.split("::")
    names[0] = names[0].removesuffix(".py").replace("/", ".")
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def _run_task(task: Task, files: list[str], expected: list[str], work: Path, timeout: float) -> TaskGrade:
    ids = [i for i in expected if i.split("::", 1)[0] in files]
    report = work / "results" / f"{task.id}.xml"
    report.parent.mkdir(exist_ok=True)
    log = work / "results" / f"{task.id}.log"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(_pytest(work, "-q", f"--junitxml={report}", *files), cwd=work, env=_env(work),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: pytest and anything the submission started
            proc.wait()
            code = None
    seconds = time.perf_counter() - start
    args = (task.id, task.title, task.points)
    if code is None:
        note = f"timed out after {timeout:g} s (an endless loop or a far too slow implementation?): 0 points"
        return TaskGrade(*args, "timeout", seconds, [GradedTest(i, "not run") for i in ids], note)
    if not report.exists():
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        note = f"the test process crashed ({how}) before reporting{_crash_site(log.read_text(errors='replace'))}"
        return TaskGrade(*args, "crashed", seconds, [GradedTest(i, "not run") for i in ids],
                         note.replace(f"{work}/", "") + "; 0 points")
    outcomes, broken_files = _parse_junit(report, work)
    tests = []
    for node_id in ids:
        file = node_id.split("::", 1)[0]
        result = outcomes.get(_junit_key(node_id))
        if result is None:  # pytest stops at a collection error, so no test of the task ran
            why = broken_files.get(file) or next(iter(broken_files.values()), "did not run")
            result = GradedTest(node_id, "not run", why)
        tests.append(GradedTest(node_id, result.outcome, result.message))
    return TaskGrade(*args, "graded", seconds, tests)


def _crash_site(log: str) -> str:
    """Where a crashed run died: the first frame of Python's fatal-error traceback (pytest enables faulthandler),
    else the last lines of its output."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), None)
    if fatal is not None:
        frame = next((line for line in lines[fatal:] if line.startswith("File ")), "")
        return f": {lines[fatal]}, in {frame.removeprefix('File ')}" if frame else f": {lines[fatal]}"
    tail = " / ".join(lines[-3:])
    return f": {tail[-MESSAGE_CHARS:]}" if tail else ""


def _parse_junit(path: Path, work: Path) -> tuple[dict[tuple[str, str], GradedTest], dict[str, str]]:
    """Results by (classname, name), and the message of each test file that failed to collect; paths in the
    messages are relative to the grading tree `work`."""
    results, broken = {}, {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = child.get("message") or tag
                if message == "collection failure":  # the details are in the text, on pytest's "E   " lines
                    details = [line[1:].strip() for line in (child.text or "").splitlines() if line.startswith("E ")]
                    where = next((d for d in reversed(details) if d.startswith('File "')), "")
                    error = details[-1] if details else "see the pytest output"
                    message = f"collection failure: {error}" + (f" ({where.removeprefix('File ')})" if where else "")
                message = _first_lines(message.replace(f"{work}/", ""))
                break
        if outcome == "error" and not case.get("classname"):  # a file that failed to collect, named like a module
            broken[case.get("name", "").replace(".", "/") + ".py"] = message
            continue
        results[(case.get("classname", ""), case.get("name", ""))] = GradedTest("", outcome, message)
    return results, broken


def _first_lines(message: str) -> str:
    text = " ".join(line.strip() for line in message.strip().splitlines()[:2])
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_reports(result: Grade, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "grade.json", out / "grade.md"
    json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    md_path.write_text(result.to_markdown())
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("submission", nargs="?", type=Path, default=ROOT, help="hw3 tree to grade (default: this)")
    parser.add_argument("--out", type=Path, default=Path("."), help="where to write grade.json and grade.md")
    parser.add_argument("--tasks", help="comma-separated task ids to grade (default: all), e.g. 1.1,2.3")
    parser.add_argument("--timeout", type=float, help="seconds per task (default: each task's own limit)")
    parser.add_argument("--jobs", type=int, default=1, help="tasks graded at the same time (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary grading tree, for debugging")
    args = parser.parse_args(argv)
    try:
        tasks = [task_by_id(t.strip()) for t in args.tasks.split(",")] if args.tasks else None
        result = grade(args.submission, tasks, args.timeout, jobs=args.jobs, keep=args.keep)
    except (RegionError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"course.grade: {err}", file=sys.stderr)
        return 2
    json_path, md_path = write_reports(result, args.out)
    print(result.to_markdown())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
