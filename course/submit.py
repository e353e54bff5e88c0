"""Hand in: `python -m course.submit [--id ID] [--profile smoke|quick|full] [--notebooks 1_1,2_1]` (`make submit`).

In the student's tree, in order:

1. grades the submission with the public graded checks (`course.grade`, in its sandbox) and prints the preview
   grade (the instructor's grade adds hidden checks);
2. executes the notebooks (`course.run_notebooks`; the smoke profile by default, `--profile quick` regenerates the
   real figures), each saved with its outputs; a notebook that fails is reported by name and cell, and the next
   one runs;
3. renders the student's report.md (the report template with the student's own fig/ values: `{{ table: ... }}`
   and `{{ value: ... }}` directives are filled in, `course.report`);
4. writes `submission-<id>.zip`: the `.py` files of common/, fm/ and gm/, report.md (rendered), fig/, the executed
   notebooks (notebooks/) and `manifest.json`: every other file with its SHA-256 and size, the release's version,
   the preview grade, the date, the profile, each notebook's outcome, and `complete: false` with the problems when
   a notebook failed, the report did not render or the preview could not run.

The zip is written whatever fails: hand it in, and fix and resubmit if the manifest says incomplete.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import re
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from common.paths import fig_dir
from common.profile import PROFILES
from course.grade import grade
from course.regions import PACKAGES
from course.release import RELEASE_INFO, release_info
from course.report import ReportError, render
from course.run_notebooks import NotebookError, list_notebooks, resolve, run_notebook
from course.sandbox import SandboxUnavailable

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"


@dataclass
class NotebookRun:
    name: str
    ok: bool
    seconds: float
    error: str = ""  # "failed in cell 5: NotImplementedError: Task 2.1: implement kl_divergence ..."


def preview(tree: Path, jobs: int = 2) -> tuple[dict | None, str]:
    """The grade of `tree` by its own grader (public checks in a release), printed; (summary, "") or (None, why)."""
    try:
        result = grade(tree, root=tree, jobs=jobs)
    except (SandboxUnavailable, ValueError, RuntimeError) as err:
        return None, f"the preview grade could not run: {err}"
    print(result.to_markdown())
    report = result.to_json()
    return {"points": report["points"], "max_points": report["max_points"], "percent": report["percent"],
            "hidden_tests": report["hidden_tests"], "tasks": {t["id"]: t["points"] for t in report["tasks"]}}, ""


def run_notebooks(names: list[str] | None, profile: str, saved: Path) -> list[NotebookRun]:
    """Execute the notebooks (all, or `names`) in order, each saved to `saved`/<name> with its outputs."""
    paths = [resolve(n) for n in names] if names else list_notebooks()
    saved.mkdir(parents=True, exist_ok=True)
    runs = []
    for path in paths:
        print(f"== running {path.name} (profile {profile})", flush=True)
        try:
            seconds = run_notebook(path, profile, save_to=saved / path.name)
            runs.append(NotebookRun(path.name, True, round(seconds, 1)))
        except NotebookError as err:
            runs.append(NotebookRun(path.name, False, 0.0, _where(str(err))))
            print(f"== {path.name}: {runs[-1].error}", file=sys.stderr, flush=True)
        except Exception as err:  # a kernel that died or did not start: reported like a failing cell
            runs.append(NotebookRun(path.name, False, 0.0, f"{type(err).__name__}: {err}"[:300]))
            print(f"== {path.name}: {runs[-1].error}", file=sys.stderr, flush=True)
    return runs


def _where(message: str) -> str:
    """'failed in cell N: <the exception's last line>' from the runner's NotebookError text."""
    cell = re.search(r"failed in cell (\S+):", message)
    errors = [line.strip() for line in message.splitlines() if re.match(r"^\w*(Error|Exception|Interrupt)\b", line)]
    last = errors[-1] if errors else message.strip().splitlines()[-1] if message.strip() else "?"
    head = f"failed in cell {cell[1]}" if cell else message.strip().splitlines()[0]
    return f"{head}: {last}"[:400]


def render_report(tree: Path) -> tuple[str, str]:
    """The student's report.md with its directives filled in from their fig/; (text, "") or (raw text, why)."""
    template = "report/template.md" if (tree / "report" / "template.md").is_file() else "report.md"
    raw = (tree / template).read_text() if (tree / template).is_file() else ""
    if not raw:
        return "", f"no {template} to hand in"
    try:
        return render(template, tree), ""
    except ReportError as err:
        return raw, f"report.md did not render: {err}"


def submission_files(tree: Path, figs: Path) -> dict[str, Path]:
    """{name in the zip: file}: the package's .py files and fig/ (from the figure folder the notebooks wrote)."""
    files = {}
    for package in PACKAGES:
        for path in sorted((tree / package).rglob("*.py")):
            if "__pycache__" not in path.parts and path.is_file() and not path.is_symlink():
                files[path.relative_to(tree).as_posix()] = path
    if figs.is_dir():
        for path in sorted(figs.rglob("*")):
            if path.is_file() and not path.is_symlink():
                files["fig/" + path.relative_to(figs).as_posix()] = path
    return files


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def submit(tree: Path = ROOT, student: str | None = None, profile: str = "smoke", notebooks: list[str] | None = None,
           out: Path | None = None, grade_preview: bool = True) -> tuple[Path, dict]:
    """Run the hand-in steps on `tree` (see the module's docstring); returns the zip's path and its manifest."""
    tree = tree.resolve()
    student = re.sub(r"[^A-Za-z0-9._-]", "_", student or getpass.getuser())
    problems = []
    grade_summary, why = preview(tree) if grade_preview else (None, "the preview grade was not asked for")
    if why:
        problems.append(why)
    with tempfile.TemporaryDirectory(prefix="hw3-submit-") as staging:
        runs = run_notebooks(notebooks, profile, Path(staging) / "notebooks")
        problems += [f"notebook {r.name} {r.error}" for r in runs if not r.ok]
        report, why = render_report(tree)
        if why:
            problems.append(why)
        contents = {name: path.read_bytes() for name, path in submission_files(tree, fig_dir()).items()}
        contents["report.md"] = report.encode()
        for run in runs:
            executed = Path(staging) / "notebooks" / run.name
            if executed.is_file():
                contents[f"notebooks/{run.name}"] = executed.read_bytes()
    info = tree / RELEASE_INFO
    manifest = {
        "id": student, "release": json.loads(info.read_text()) if info.is_file() else release_info(tree),
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "profile": profile,
        "complete": not problems, "problems": problems, "preview_grade": grade_summary,
        "notebooks": [asdict(r) for r in runs],
        "files": [{"path": n, "sha256": _sha256(data), "bytes": len(data)} for n, data in sorted(contents.items())],
    }
    out = (out or tree).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"submission-{student}.zip"
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(contents.items()):
            zf.writestr(name, data)
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--id", help="your student id, in the zip's name (default: your user name)")
    parser.add_argument("--profile", default="smoke", choices=PROFILES,
                        help="profile the notebooks run in (default smoke; quick regenerates the real figures)")
    parser.add_argument("--notebooks", help="comma-separated notebooks to run (default: all), e.g. 1_1,2_1")
    parser.add_argument("--out", type=Path, help="folder for submission-<id>.zip (default: this tree)")
    parser.add_argument("--no-grade", action="store_true", help="skip the preview grade")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.notebooks.split(",") if n.strip()] if args.notebooks else None
    try:
        path, manifest = submit(ROOT, args.id, args.profile, names, args.out, not args.no_grade)
    except NotebookError as err:  # an unknown notebook name
        print(f"course.submit: {err}", file=sys.stderr)
        return 2
    grade_line = (f"preview grade {manifest['preview_grade']['points']:g} / {manifest['preview_grade']['max_points']}"
                  if manifest["preview_grade"] else "no preview grade")
    print(f"wrote {path} ({len(manifest['files'])} files; {grade_line})")
    if manifest["problems"]:
        print("INCOMPLETE: the zip is written and marked incomplete in its manifest; fix these and run make submit "
              "again:\n  - " + "\n  - ".join(manifest["problems"]), file=sys.stderr)
        return 1
    print("complete: hand in this zip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
