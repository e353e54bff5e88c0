"""The student release: `python -m course.release --out dist/student` (`make student`).

Writes a copy of the package in which every solution region is replaced by `raise NotImplementedError("Task ...")`
(`course.regions`), the notebooks without outputs, the tests a student checks their work with, the public graded
tests and the grader, `course/README_STUDENT.md` as README.md (with the task table filled in from
`course.tasks`) and `course/report_template.md` as report.md. Left out: the solution's report and figures
(fig/), checkpoints, caches, virtual environments, dist/, the hidden graded checks (grading/hidden/), the theory
problems' solutions (`course.regions.PRIVATE_SOURCES`, `notebooks/0_theory.ipynb`: the student README lists the
problems to answer with derivations in the report), the package's tests of the task functions (they write the
graded formulas out) and the tests of the solution's own results or of this tooling (PRIVATE). The public checks'
reference outputs, computed from the solution, ship in `grading/references/` for the student's preview grade.

Before anything is written, every region must map to a task and every function a task lists must hold a region
(else its solution would ship). The release is refused if a shipped file repeats two consecutive statement lines
of a solution region (`course.audit`). After writing, every module of the release is imported in a fresh
interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import nbformat

from course.audit import find_leaks
from course.references import SHIPPED, write_public_references
from course.regions import PACKAGES, PRIVATE_SOURCES, Region, RegionError, scan_tree, source_files, strip_regions
from course.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
TREES = (*PACKAGES, "notebooks", "tests", "grading", "course", "bench")  # bench: the GPU probe, and tests import it
TOP_FILES = ("Makefile", "requirements.txt", "requirements-offline.txt", "pyproject.toml", ".gitignore")
PRIVATE = ("grading/hidden", "tests/test_course.py", "tests/test_report.py", "tests/test_theory.py",
           "tests/test_grade_attacks.py", "tests/test_browser.py", "tests/test_submit.py", "tests/test_grade_all.py",
           "notebooks/0_theory.ipynb", str(SHIPPED),
           *PRIVATE_SOURCES, *(p for t in TASKS for p in t.package_tests))
SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints", ".pytest_cache", ".ruff_cache"}
STUDENT_README = "course/README_STUDENT.md"
REPORT_TEMPLATE = "course/report_template.md"
TASK_TABLE = "<!-- task table -->"  # where README_STUDENT.md gets the table of tasks
MARKER = ".hw3-student-release"  # marks a folder this tool wrote, so a rebuild may replace it
RELEASE_INFO = "release.json"  # the release's version, source commit and date: `make submit` quotes it


@dataclass
class Release:
    out: Path
    regions: list[Region]
    files: int


def check_regions(root: Path) -> list[Region]:
    """The regions of the tree at `root`; raises RegionError unless every task's every function holds one."""
    regions = scan_tree(root)
    if not regions:
        raise RegionError(f"no solution regions in {', '.join(PACKAGES)} under {root}: nothing to release "
                          "(is this already a student release?)")
    found = {r.function for r in regions}
    missing = [f"{t.id}: {f}" for t in TASKS for f in t.functions if f not in found]
    if missing:
        raise RegionError(f"course/tasks.py lists functions without a solution region, whose solution would ship: "
                          f"{', '.join(missing)}; mark their bodies with {'### BEGIN SOLUTION'!r} or remove them "
                          "from the table")
    return regions


def build_release(out: Path, root: Path = ROOT, check_imports: bool = True) -> Release:
    """Write the student release of the tree at `root` to `out` (replacing an earlier release there)."""
    root, out = root.resolve(), out.resolve()
    _check_out(out, root)
    regions = check_regions(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        files = _write_tree(root, staging, regions)
        leaks = find_leaks(staging, regions, root)
        if leaks:
            raise RegionError(f"the release would leak the solution in {len(leaks)} place(s); not written:\n"
                              + "\n".join(str(leak) for leak in leaks[:20]))
        files += write_public_references(root, staging / SHIPPED)
        if check_imports:
            check_release_imports(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Release(out, regions, files)


def _check_out(out: Path, root: Path) -> None:
    if out == root or out in root.parents or any(out.is_relative_to(root / tree) for tree in TREES):
        raise ValueError(f"--out {out} would overwrite the source tree; choose a new folder such as dist/student")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(f"{out} exists and is not a student release written by course.release; "
                         "remove it or choose another --out")


def _write_tree(root: Path, out: Path, regions: list[Region]) -> int:
    files = 0
    for tree in TREES:
        for src in sorted((root / tree).rglob("*")):
            rel = src.relative_to(root).as_posix()
            if src.is_dir() or SKIP_DIRS & set(src.relative_to(root).parts) or _private(rel):
                continue
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix == ".py" and tree in PACKAGES:
                dst.write_text(strip_regions(src.read_text(), rel)[0])
            elif src.suffix == ".ipynb":
                write_without_outputs(src, dst)
            else:
                shutil.copyfile(src, dst)
            files += 1
    for name in TOP_FILES:
        shutil.copyfile(root / name, out / name)
    readme = (root / STUDENT_README).read_text()
    if TASK_TABLE not in readme:
        raise ValueError(f"{STUDENT_README} lost its {TASK_TABLE!r} line, where the table of tasks goes")
    (out / "README.md").write_text(readme.replace(TASK_TABLE, task_table(regions)))
    shutil.copyfile(root / REPORT_TEMPLATE, out / "report.md")
    (out / MARKER).write_text("written by `python -m course.release`; rebuilding replaces this folder\n")
    (out / RELEASE_INFO).write_text(json.dumps(release_info(root), indent=2) + "\n")
    return files + len(TOP_FILES) + 3


def release_info(root: Path) -> dict:
    """The package's version (pyproject.toml), the source tree's git commit (None outside git) and the date."""
    version = re.search(r'^version\s*=\s*"([^"]+)"', (root / "pyproject.toml").read_text(), re.M)[1]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    commit = git.stdout.strip() if git.returncode == 0 else None
    return {"version": version, "commit": commit, "built": datetime.now(UTC).isoformat(timespec="seconds")}


def _private(rel: str) -> bool:
    return any(rel == p or rel.startswith(p + "/") for p in PRIVATE)


def write_without_outputs(src: Path, dst: Path) -> None:
    """Copy a notebook with its outputs, execution counts and execution metadata removed."""
    notebook = nbformat.read(src, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    notebook.metadata.pop("widgets", None)
    nbformat.write(notebook, dst)


def task_table(regions: list[Region]) -> str:
    """Markdown table: per task, what to implement and where, its notebook, points and how to check it."""
    rows = ["| task | implement | in | notebook | points | check your work |", "|---|---|---|---|---|---|"]
    for task in TASKS:
        mine = [r for r in regions if r.task is task]
        functions = ", ".join(dict.fromkeys(f"`{r.function}`" for r in mine))
        files = ", ".join(dict.fromkeys(f"`{r.path}`" for r in mine))
        checks = f"`make grade TASKS={task.id}`"
        rows.append(f"| {task.id} {task.title} | {functions} | {files} | `{task.notebook}` | {task.points} | "
                    f"{checks} |")
    return "\n".join(rows)


def check_release_imports(tree: Path) -> None:
    """Import every module of PACKAGES in `tree` in a fresh interpreter; raises RuntimeError with its output."""
    modules = [".".join(p.relative_to(tree).with_suffix("").parts).removesuffix(".__init__")
               for p in source_files(tree)]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *modules], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the student release does not import cleanly:\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / "student", help="where to write the release")
    parser.add_argument("--no-import-check", action="store_true", help="skip importing the release's modules")
    args = parser.parse_args(argv)
    try:
        release = build_release(args.out, check_imports=not args.no_import_check)
    except (RegionError, ValueError, RuntimeError) as err:
        print(f"course.release: {err}", file=sys.stderr)
        return 1
    by_task = {t.id: sum(r.task is t for r in release.regions) for t in TASKS}
    print(f"wrote the student release to {release.out}: {release.files} files, {len(release.regions)} solution "
          f"regions cut ({', '.join(f'{k}: {v}' for k, v in by_task.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
