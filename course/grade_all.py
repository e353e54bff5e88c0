"""Grade a whole class: `python -m course.grade_all SUBMISSIONS --out OUT [--jobs N] [--gradescope]`
(`make grade-all SUBMISSIONS=dir OUT=dir JOBS=n`).

Every entry of SUBMISSIONS is one submission: a folder (a hw3 tree) or a zip (what `make submit` writes, or any zip
holding a hw3 tree at its top or in its one top folder). Its id is the folder's name, or the zip's name without
`submission-` and `.zip`. Zips are unpacked into a temporary folder after every entry is checked: a path outside the
folder, a symbolic link, more than `MAX_FILES` files or more than `MAX_BYTES` bytes gets the submission refused.

Each submission is graded by its own `python -m course.grade` process (the sandboxed grader: the submission's code
runs only in its bubblewrap workers), up to JOBS at once. A grading that crashes, overruns its time (the sum of the
tasks' limits plus a margin) or is refused never stops the batch: the submission gets its row with the reason.
Everything is written to OUT, never into a submission:

- `OUT/<id>/grade.md`, `OUT/<id>/grade.json` (the grader's), `OUT/<id>/batch.json` (status, reason, seconds and the
  hash of what was graded), and with `--gradescope` `OUT/<id>/results.json` in Gradescope's autograder format;
- `OUT/gradebook.csv`: one row per submission: id, the points of each task, total, status, seconds, reason;
- `OUT/summary.md`: per task the mean, median and a histogram of the points, the most frequent first failures, and
  the submissions that failed to grade (`course.gradebook` writes these two and the Gradescope results).

A re-run skips every submission whose files (the zip's bytes, or a folder's graded `.py` files), grader checks and
options have the hash recorded in its batch.json, so grading late submissions costs only those.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from course.grade import Grade, TaskGrade, write_reports
from course.gradebook import Row, gradescope_results, summary, write_gradebook
from course.regions import PACKAGES
from course.sandbox import MODES, SandboxUnavailable, check_available
from course.tasks import TASKS, Task, task_by_id

ROOT = Path(__file__).resolve().parent.parent
MAX_FILES = 5000  # a `make submit` zip holds ~100 code files, report.md, fig/ and ~10 notebooks
MAX_BYTES = 512 << 20  # unpacked; fig/ and executed notebooks of the quick profile are a few tens of MiB
MARGIN_S = 60  # a grading process's limit: the sum of its tasks' limits plus this (imports, references)


class RefusedZip(ValueError):
    """A zip the batch will not unpack; the message says which entry and why."""


@dataclass
class Submission:
    id: str
    path: Path  # a folder or a zip in SUBMISSIONS
    digest: str = ""  # what was graded, with the grader's checks and options


# ---------------------------------------------------------------------------------------------- finding submissions
def find_submissions(folder: Path) -> list[Submission]:
    """Every folder and zip directly in `folder`, by id; two entries with one id are an error naming both."""
    if not folder.is_dir():
        raise ValueError(f"SUBMISSIONS {folder} is not a folder; give the folder holding one folder or zip per student")
    found: dict[str, Submission] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not (path.is_dir() or path.suffix == ".zip"):
            continue
        sid = submission_id(path)
        if sid in found:
            raise ValueError(f"{found[sid].path.name} and {path.name} both have the id {sid!r}; rename one")
        found[sid] = Submission(sid, path)
    return sorted(found.values(), key=lambda s: s.id)


def submission_id(path: Path) -> str:
    """`alice` for `alice/`, `alice.zip` or `submission-alice.zip`; characters other than letters, digits, `.-_`
    become `_` (the id names a folder in OUT)."""
    name = path.name.removesuffix(".zip") if path.suffix == ".zip" else path.name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.removeprefix("submission-")) or "_"


def digest(submission: Path, options: dict, root: Path = ROOT) -> str:
    """SHA-256 of what grading reads: the zip's bytes or the folder's `.py` files of PACKAGES (paths and contents),
    the grader's checks and task table, and the options."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    if submission.is_file():
        h.update(submission.read_bytes())
    else:
        for package in PACKAGES:
            for path in sorted((submission / package).rglob("*.py")):
                h.update(path.relative_to(submission).as_posix().encode() + b"\0" + path.read_bytes())
    for path in sorted([*(root / "grading").rglob("task_*.py"), root / "course" / "tasks.py"]):
        h.update(path.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- unpacking zips
def safe_unzip(archive: Path, dest: Path, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES) -> Path:
    """Unpack `archive` into the empty folder `dest` after checking every entry; returns the hw3 tree in it (`dest`
    or its one top folder). Raises RefusedZip for a path outside `dest`, a link, too many files or bytes."""
    try:
        with zipfile.ZipFile(archive) as zf:
            entries = zf.infolist()
            if len(entries) > max_files:
                raise RefusedZip(f"{len(entries)} entries, more than the limit of {max_files}")
            declared = 0
            for info in entries:
                name = info.filename
                parts = Path(name.replace("\\", "/")).parts
                if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                    raise RefusedZip(f"the entry {name!r} points outside the submission's folder")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise RefusedZip(f"the entry {name!r} is a symbolic link; a submission holds its own files")
                declared += info.file_size
                if declared > max_bytes:
                    raise RefusedZip(f"more than {max_bytes >> 20} MiB unpacked")
            written = 0
            for info in entries:
                target = dest / info.filename
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):  # counted as read: an entry may lie about its size
                        written += len(chunk)
                        if written > max_bytes:
                            raise RefusedZip(f"more than {max_bytes >> 20} MiB unpacked")
                        dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as err:
        raise RefusedZip(f"not a readable zip ({type(err).__name__}: {err})") from None
    tops = [p for p in dest.iterdir() if p.name != "__MACOSX"]
    if not any((dest / p).is_dir() for p in PACKAGES) and len(tops) == 1 and tops[0].is_dir():
        return tops[0]
    return dest


# ---------------------------------------------------------------------------------------------- grading one
def grade_one(sub: Submission, out: Path, tasks: list[Task], options: dict, gradescope: bool) -> Row:
    """Grade `sub` in its own grader process into `out`/<id>/; never raises: a failure is the row's status."""
    folder = out / sub.id
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    unpacked = Path(tempfile.mkdtemp(prefix=f"hw3-unzip-{sub.id}-")) if sub.path.is_file() else None
    try:
        tree = safe_unzip(sub.path, unpacked) if unpacked else sub.path.resolve()
        row = _run_grader(sub, tree, folder, tasks, options)
    except RefusedZip as err:
        row = Row(sub.id, "refused", 0.0, reason=f"zip refused: {err}")
    except Exception as err:  # the batch goes on whatever one submission does
        row = Row(sub.id, "error", 0.0, reason=f"{type(err).__name__}: {err}")
    finally:
        if unpacked:
            shutil.rmtree(unpacked, ignore_errors=True)
    row.seconds, row.digest = round(time.perf_counter() - start, 1), sub.digest
    if not (folder / "grade.json").is_file():
        _write_failed(row, sub, folder, tasks, options)
    if gradescope:
        _write_json(folder / "results.json", gradescope_results(json.loads((folder / "grade.json").read_text())))
    _write_json(folder / "batch.json", asdict(row))
    return row


def _run_grader(sub: Submission, tree: Path, folder: Path, tasks: list[Task], options: dict) -> Row:
    for name in ("grade.json", "grade.md"):
        (folder / name).unlink(missing_ok=True)  # a failed run must not leave an older grade behind
    command = [sys.executable, "-m", "course.grade", str(tree), "--out", str(folder), "--jobs", "1",
               "--sandbox", options["sandbox"], "--tasks", ",".join(t.id for t in tasks)]
    if options["timeout"]:
        command += ["--timeout", str(options["timeout"])]
    limit = sum(options["timeout"] or t.timeout for t in tasks) + MARGIN_S
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        # past the limit the grader is killed, and its sandboxed worker with it (bwrap --die-with-parent)
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return Row(sub.id, "timeout", 0.0, reason=f"the grader did not finish in {limit} s")
    if proc.returncode != 0 or not (folder / "grade.json").is_file():
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        reason = " / ".join(lines[-2:])[-300:] or f"exit code {proc.returncode}"
        status = "refused" if "not a hw3 tree" in reason else "error"
        return Row(sub.id, status, 0.0, reason=reason.removeprefix("course.grade: "))
    report = json.loads((folder / "grade.json").read_text())
    points = {t["id"]: t["points"] for t in report["tasks"]}
    bad = [t for t in report["tasks"] if t["status"] != "graded"]
    if not bad:
        return Row(sub.id, "graded", 0.0, points)
    # the worst task's status names the row: a refusal, then a timeout, then a crash
    status = min((t["status"] for t in bad), key=lambda s: ("refused", "timeout", "crashed").index(s)
                 if s in ("refused", "timeout", "crashed") else 3)
    reason = "; ".join(f"{t['id']}: {t['note']}" for t in bad)
    return Row(sub.id, status, 0.0, points, reason[:500])


def _write_failed(row: Row, sub: Submission, folder: Path, tasks: list[Task], options: dict) -> None:
    """grade.json and grade.md for a submission the grader never graded: every task 0 with the reason."""
    results = [TaskGrade(t.id, t.title, t.points, "refused", 0.0, [], f"{row.status}: {row.reason}") for t in tasks]
    row.points = {t.id: 0.0 for t in tasks}
    write_reports(Grade(str(sub.path), False, options["sandbox"], row.seconds, results), folder)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- the batch
def grade_all(submissions: Path, out: Path, jobs: int = 1, tasks: list[Task] | None = None,
              timeout: float | None = None, sandbox: str = "bwrap", gradescope: bool = False,
              log=print) -> list[Row]:
    """Grade every submission in `submissions` into `out` (see the module's docstring); returns the rows."""
    submissions, out = submissions.resolve(), Path(os.path.abspath(out))
    if out == submissions or out.is_relative_to(submissions):
        raise ValueError(f"OUT {out} is inside SUBMISSIONS {submissions}; write the grades elsewhere")
    check_available(sandbox)
    tasks = list(TASKS) if tasks is None else tasks
    options = {"tasks": [t.id for t in tasks], "timeout": timeout, "sandbox": sandbox}
    subs = find_submissions(submissions)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Row] = {}
    todo = []
    for sub in subs:
        sub.digest = digest(sub.path, options)
        previous = _previous(out / sub.id, sub.digest, gradescope)
        if previous:
            rows[sub.id] = previous
        else:
            todo.append(sub)
    log(f"{len(subs)} submissions: {len(rows)} unchanged since graded, {len(todo)} to grade with {jobs} job(s)")

    def one(sub: Submission) -> Row:
        row = grade_one(sub, out, tasks, options, gradescope)
        why = f": {row.reason}" if row.reason else ""
        log(f"  {sub.id}: {row.total:g} points, {row.status} ({row.seconds:.1f} s){why}")
        return row

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for row in pool.map(one, todo):
            rows[row.id] = row
    ordered = [rows[s.id] for s in subs]
    write_gradebook(ordered, tasks, out / "gradebook.csv")
    (out / "summary.md").write_text(summary(ordered, tasks, out))
    return ordered


def _previous(folder: Path, sub_digest: str, gradescope: bool) -> Row | None:
    """The row recorded in `folder`/batch.json if it graded these very files with these options, else None."""
    try:
        row = Row(**json.loads((folder / "batch.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    complete = (folder / "grade.json").is_file() and (not gradescope or (folder / "results.json").is_file())
    if row.digest != sub_digest or not complete:
        return None
    row.skipped = True
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("submissions", type=Path, help="folder with one folder or zip per submission")
    parser.add_argument("--out", type=Path, required=True, help="where grades, gradebook.csv and summary.md go")
    parser.add_argument("--jobs", type=int, default=1, help="submissions graded at the same time (default 1)")
    parser.add_argument("--tasks", help="comma-separated task ids to grade (default: all)")
    parser.add_argument("--timeout", type=float, help="seconds per task (default: each task's own limit)")
    parser.add_argument("--sandbox", choices=[*MODES, "docker"], default="bwrap")
    parser.add_argument("--gradescope", action="store_true", help="also write <id>/results.json for Gradescope")
    args = parser.parse_args(argv)
    try:
        tasks = [task_by_id(t.strip()) for t in args.tasks.split(",") if t.strip()] if args.tasks else None
        rows = grade_all(args.submissions, args.out, args.jobs, tasks, args.timeout, args.sandbox, args.gradescope)
    except SandboxUnavailable as err:
        print(f"course.grade_all: {err}", file=sys.stderr)
        return 3
    except ValueError as err:
        print(f"course.grade_all: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'gradebook.csv'} and {args.out / 'summary.md'} ({len(rows)} submissions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
