"""Autograder: `python -m course.grade SUBMISSION --out DIR [--tasks 1.1,2.3] [--sandbox bwrap|none]` (`make grade`).

The grader never imports a submission. It copies the submission's Python files of `common/`, `fm/`, `gm/` over its
own package with every solution region cut out (a file the submission lacks is a stub, never the solution; a
symbolic link anywhere in those folders gets the submission refused), and per task runs one worker process
(`course.worker`) in a sandbox (`course.sandbox`, bubblewrap by default) under the task's time limit. The grader
builds every check's inputs (`course.checks`, from `grading/`), the worker calls the submission's functions on them
and writes the outputs back as safetensors and JSON, and the grader judges them: type, shape, dtype and values
against reference outputs computed in this process from its own copy of the solution (in a student release, which
has no solution: against the public checks' reference outputs that `make student` shipped in
`grading/references/`). A task whose worker hangs or crashes gets 0 points with the reason; a task in which a
function returns one of its inputs unchanged (a stub) gets 0 points.

Prints grade.md and writes grade.json (`points`, `max_points`, per task every check's outcome and message) and
grade.md (every failed check) to --out: atomically, never through a symbolic link, never inside the submission.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from course import references
from course.checks import Check, has_hidden, judge, load_checks
from course.regions import PACKAGES, RegionError, source_files, strip_regions
from course.sandbox import CODE_IN_SANDBOX, MODES, Limits, Run, SandboxUnavailable, check_available, run_worker
from course.tasks import TASKS, Task, task_by_id
from course.worker import load_values, save_values

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class GradedTest:
    id: str  # the check's name ("hidden: ..." for a hidden one)
    outcome: str  # passed | failed | not run
    message: str = ""


@dataclass
class TaskGrade:
    id: str
    title: str
    max_points: int
    status: str  # graded | timeout | crashed | refused
    seconds: float
    tests: list[GradedTest]
    note: str = ""  # why the task has fewer results or 0 points: a timeout, a crash, a stub, a refusal
    stub: bool = False  # a function returned one of its inputs unchanged: 0 points

    @property
    def passed(self) -> int:
        return sum(t.outcome == "passed" for t in self.tests)

    @property
    def total(self) -> int:
        return len(self.tests)

    @property
    def points(self) -> float:
        if self.stub or not self.total:
            return 0.0
        return round(self.max_points * self.passed / self.total, 2)

    @property
    def failures(self) -> list[GradedTest]:
        return [t for t in self.tests if t.outcome != "passed"]


@dataclass
class Grade:
    submission: str
    hidden_tests: bool  # whether this grader has (and ran) the hidden checks
    sandbox: str  # bwrap | none
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
            tasks.append({"id": t.id, "title": t.title, "status": t.status, "passed": t.passed, "total": t.total,
                          "points": t.points, "max_points": t.max_points, "seconds": round(t.seconds, 1),
                          "note": t.note, "stub": t.stub, "tests": [asdict(r) for r in t.tests]})
        return {"submission": self.submission, "points": self.points, "max_points": self.max_points,
                "percent": round(100 * self.points / self.max_points, 1) if self.max_points else 0.0,
                "hidden_tests": self.hidden_tests, "sandbox": self.sandbox, "seconds": round(self.seconds, 1),
                "tasks": tasks}

    def to_markdown(self) -> str:
        percent = self.to_json()["percent"]
        checks = ("public and hidden graded checks" if self.hidden_tests
                  else "public graded checks only (no hidden checks here: a preview of the grade)")
        sandbox = ("in a bubblewrap sandbox" if self.sandbox == "bwrap" else
                   "**without a sandbox (--sandbox none): the submission's code ran with the grader's rights**")
        lines = [f"# Grade of `{escape(self.submission)}`", "",
                 f"**{self.points:g} / {self.max_points} points ({percent:g} %)**; {checks}; {sandbox}; "
                 f"{self.seconds:.0f} s.", "",
                 "| task | checks passed | points | time (s) | note |", "|---|---|---|---|---|"]
        for t in self.tasks:
            lines.append(f"| {t.id} {escape(t.title)} | {t.passed} / {t.total} | {t.points:g} / {t.max_points} | "
                         f"{t.seconds:.1f} | {escape(t.note)} |")
        failed = [(t, f) for t in self.tasks for f in t.failures]
        if failed:
            lines += ["", "## Failed checks", ""]
            lines += [f"- **{t.id}** {escape(f.id)} ({f.outcome}): {escape(f.message)}" for t, f in failed]
        return "\n".join(lines) + "\n"


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+!|~>-])")


def escape(text: str) -> str:
    """Text from a submission (or about it) as inert Markdown: HTML escaped, Markdown's specials backslashed,
    on one line."""
    return _MARKDOWN.sub(r"\\\1", html.escape(" ".join(text.split()), quote=False))


class Refused(ValueError):
    """A submission the grader will not run (a symbolic link in its code)."""


def grade(submission: Path, tasks: list[Task] | None = None, timeout: float | None = None, root: Path = ROOT,
          jobs: int = 1, keep: bool = False, sandbox: str = "bwrap", limits: Limits | None = None) -> Grade:
    """Grade the hw3 tree at `submission` on `tasks` (default: all) with the grader's tree at `root`.

    timeout: seconds per task (default: each task's own). jobs: tasks run at the same time. keep: leave the
    temporary folder (its path is printed). sandbox: "bwrap" or, asked for by name, "none".
    """
    submission, root = Path(os.path.abspath(submission)), root.resolve()
    if not any((submission / p).is_dir() for p in PACKAGES):
        raise ValueError(f"{submission} is not a hw3 tree: it has none of {', '.join(p + '/' for p in PACKAGES)}")
    check_available(sandbox)
    limits = limits or Limits()
    tasks = list(TASKS) if tasks is None else tasks
    hidden = has_hidden(root)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="hw3-grade-"))
    os.chmod(work, 0o755)  # the sandbox's user reads the code and inputs below it
    try:
        try:
            _code_tree(root, submission, work / "code")
        except Refused as err:
            results = [TaskGrade(t.id, t.title, t.points, "refused", 0.0, [], f"{err}: 0 points") for t in tasks]
            return Grade(str(submission), hidden, sandbox, time.perf_counter() - start, results)
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            results = list(pool.map(lambda t: _grade_task(t, root, work, timeout or t.timeout, sandbox, limits,
                                                          hidden), tasks))
    finally:
        if keep:
            print(f"course.grade: kept the grading folder {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return Grade(str(submission), hidden, sandbox, time.perf_counter() - start, results)


def _code_tree(root: Path, submission: Path, code: Path) -> None:
    """The grader's released package with its regions cut out, and the submission's Python files over it."""
    for src in source_files(root, released=True):
        rel = src.relative_to(root).as_posix()
        dst = code / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(strip_regions(src.read_text(), rel)[0])
    for package in PACKAGES:
        top = submission / package
        if top.is_symlink():
            raise Refused(f"{package}/ is a symbolic link; a submission's code must be its own files: replace the "
                          "link by the folder")
        for folder, dirs, files in os.walk(top):
            for name in [*dirs, *files]:
                path = Path(folder) / name
                if path.is_symlink():
                    raise Refused(f"{path.relative_to(submission)} is a symbolic link; a submission's code must be "
                                  "its own files: replace the link by a copy")
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    src = Path(folder) / name
                    dst = code / src.relative_to(submission)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_bytes(src.read_bytes())
    for path in [code, *code.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _grade_task(task: Task, root: Path, work: Path, timeout: float, sandbox: str, limits: Limits,
                hidden: bool) -> TaskGrade:
    checks = load_checks(root, task.id, hidden)
    io = work / "io" / task.id
    (io / "in").mkdir(parents=True)
    inputs = []
    for index, check in enumerate(checks):
        inputs.append(check.inputs())
        save_values(inputs[-1], io / "in" / str(index))
    (io / "in" / "plan.json").write_text(json.dumps([c.spec for c in checks]))
    for path in [io, *io.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    run = run_worker(work / "code", io, timeout, sandbox, limits)
    args = (task.id, task.title, task.points)
    tests, stub = [], False
    for index, check in enumerate(checks):
        test, is_stub = _judge(check, inputs[index], io / "out" / str(index), root, run)
        stub |= is_stub
        tests.append(test)
    if run.stopped == "output":
        status = "crashed"
        note = f"stopped: the worker wrote more than {limits.output_bytes >> 20} MiB of outputs; checks not " \
               "finished get 0"
    elif run.returncode is None:
        status = "timeout"
        note = f"timed out after {timeout:g} s (an endless loop or a far too slow implementation?): every process " \
               "it started was stopped; checks not finished get 0"
    elif run.returncode != 0:
        status, note = "crashed", f"the worker process {_how(run.returncode)}; checks not finished get 0{_tail(run)}"
    else:
        status, note = "graded", ""
    if stub:
        note = (note + "; " if note else "") + "a function returns one of its inputs unchanged (a stub): 0 points"
    return TaskGrade(*args, status, run.seconds, tests, note, stub)


def _judge(check: Check, inputs: dict, stem: Path, root: Path, run: Run) -> tuple[GradedTest, bool]:
    """The check's result from the worker's files at `stem`, and whether it caught a stub."""
    if not stem.with_suffix(".json").exists():
        started = stem.with_suffix(".started").exists()
        why = {"time": "timed out", "output": "stopped (too much output)"}.get(run.stopped) or \
            f"the worker {_how(run.returncode)}"
        return GradedTest(check.label(), "not run", f"{why} {'during' if started else 'before'} this check"), False
    try:
        outputs = load_values(stem)
        status = json.loads(outputs.pop(":status"))
    except Exception as err:  # the worker's files are untrusted: anything unreadable is a failure
        return GradedTest(check.label(), "failed", f"unreadable outputs ({type(err).__name__}: {err})"), False
    if not isinstance(status, dict):
        status = {"error": f"an unreadable status {status!r:.80}"}
    if status.get("error"):
        message = f"raised {status['error']}" + (f"; {check.hint}" if check.hint else "")
        return GradedTest(check.label(), "failed", message), False
    reference = None if check.prop is not None else references.reference(check, inputs, root)
    verdict = judge(check, inputs, outputs, reference)
    return GradedTest(check.label(), "passed" if verdict.passed else "failed", verdict.message), verdict.stub


def _how(code: int) -> str:
    """How the worker ended: a negative code is a signal, and so is 128 + n from bwrap (the sandbox's init)."""
    number = -code if code < 0 else code - 128 if 128 < code < 128 + signal.NSIG else 0
    return f"was killed by {signal.Signals(number).name}" if number else f"exited with code {code}"


def _tail(run: Run) -> str:
    """Where a crashed worker died: the submission's innermost frame in the fatal-error traceback (the worker runs
    with faulthandler), else the last lines of its output."""
    lines = [line.strip() for line in run.log.splitlines() if line.strip()]
    frames = [line for line in lines if line.startswith(f'File "{CODE_IN_SANDBOX}/')]
    if frames:
        return f", in {frames[0].removeprefix('File ').replace(f'{CODE_IN_SANDBOX}/', '')}"
    return f" ({' / '.join(lines[-2:])[-300:]})" if lines else ""


def write_reports(result: Grade, out: Path) -> tuple[Path, Path]:
    """grade.json and grade.md in `out`, each written to a temporary file and renamed over the old one (a link
    there is replaced, never followed); `out` may not be a link, nor inside the graded submission."""
    out = Path(os.path.abspath(out))
    submission = Path(result.submission).resolve()
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link; name the folder itself")
    if out.resolve() == submission or out.resolve().is_relative_to(submission):
        raise ValueError(f"--out {out} is inside the graded submission {submission}; write the grade outside it "
                         f"(e.g. --out {submission}-grade)")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (("grade.json", json.dumps(result.to_json(), indent=2) + "\n"),
                       ("grade.md", result.to_markdown())):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out / name)
        paths.append(out / name)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("submission", type=Path, help="hw3 tree to grade")
    parser.add_argument("--out", type=Path, required=True, help="where to write grade.json and grade.md (outside "
                                                                "the submission)")
    parser.add_argument("--tasks", help="comma-separated task ids to grade (default: all), e.g. 1.1,2.3")
    parser.add_argument("--timeout", type=float, help="seconds per task (default: each task's own limit)")
    parser.add_argument("--jobs", type=int, default=1, help="tasks graded at the same time (default 1)")
    parser.add_argument("--sandbox", choices=[*MODES, "docker"], default="bwrap",
                        help="bwrap (default): bubblewrap; none: no sandbox, only when asked for by name")
    parser.add_argument("--keep", action="store_true", help="keep the temporary grading folder, for debugging")
    args = parser.parse_args(argv)
    try:
        tasks = [task_by_id(t.strip()) for t in args.tasks.split(",") if t.strip()] if args.tasks else None
        result = grade(args.submission, tasks, args.timeout, jobs=args.jobs, keep=args.keep, sandbox=args.sandbox)
        json_path, md_path = write_reports(result, args.out)
    except SandboxUnavailable as err:
        print(f"course.grade: {err}", file=sys.stderr)
        return 3
    except (RegionError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"course.grade: {err}", file=sys.stderr)
        return 2
    print(result.to_markdown())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
