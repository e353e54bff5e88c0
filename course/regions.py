"""Solution regions: find them in a source file, map each to its task, and cut them out for the student release.

A region is nbgrader's

        ### BEGIN SOLUTION
        ...the lines a student writes, up to and including the function's return...
        ### END SOLUTION

inside a function, after its docstring and input validation. The release replaces the region, markers included,
by `# YOUR CODE HERE` and one `raise NotImplementedError("Task 1.1: implement <function> (see ...)")`, so the
signature, docstring and validation stay. Anything malformed (an unbalanced or misspelt marker, a region outside a
function, one whose function no task lists, a cut that leaves invalid Python) raises `RegionError` naming the file
and line.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

from course.tasks import Task, task_of_function

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
LINE_LENGTH = 120  # pyproject.toml's ruff line-length, which the stubs keep to
PACKAGES = ("common", "fm", "gm")  # where solution regions may live (and what a submission provides)
# Modules that write a graded answer out and are not a student task: the theory problems' solutions. Neither the
# student release nor the grader's worker gets them; students answer them with derivations in their report.
PRIVATE_SOURCES = ("fm/theory_dpo.py", "fm/theory_mha.py", "fm/mha_variants.py", "gm/theory_config.py",
                   "gm/theory_ddim.py", "gm/theory_gauss.py", "gm/theory_ou.py", "gm/theory_reverse.py")
_MARKER_LIKE = re.compile(r"#+\s*(BEGIN|END)\s+SOLUTION\b.*", re.IGNORECASE)


class RegionError(ValueError):
    pass


@dataclass(frozen=True)
class Region:
    path: str  # relative to the tree's root, e.g. "fm/attention.py"
    function: str  # name of the innermost function enclosing the region
    begin: int  # 1-based line of the BEGIN marker
    end: int  # 1-based line of the END marker
    indent: str  # the markers' indentation
    task: Task

    def stub(self) -> list[str]:
        """The lines that replace the region in the student release."""
        message = json.dumps(f"Task {self.task.id}: implement {self.function} "
                             f"(see its docstring and {self.task.notebook})")  # a double-quoted literal
        raise_line = f"{self.indent}raise NotImplementedError({message})\n"
        if len(raise_line) - 1 > LINE_LENGTH:  # the same statement over three lines, within the line length
            raise_line = f"{self.indent}raise NotImplementedError(\n{self.indent}    {message}\n{self.indent})\n"
        return [f"{self.indent}# YOUR CODE HERE\n", raise_line]


def find_regions(text: str, path: str) -> list[Region]:
    """The solution regions of one Python source, in file order; `path` is used for messages and `Region.path`."""
    lines = text.splitlines(keepends=True)
    spans: list[tuple[int, int, str]] = []
    open_at: int | None = None
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped not in (BEGIN, END):
            if _MARKER_LIKE.fullmatch(stripped):
                raise RegionError(f"{path}:{number}: malformed solution marker {stripped!r}; write {BEGIN!r} "
                                  f"or {END!r} on a line of its own")
            continue
        indent = line[: len(line) - len(line.lstrip())]
        if stripped == BEGIN:
            if open_at is not None:
                raise RegionError(f"{path}:{number}: {BEGIN!r} inside the region opened at line {open_at}; "
                                  f"close it with {END!r} first (regions do not nest)")
            open_at = number
        else:
            if open_at is None:
                raise RegionError(f"{path}:{number}: {END!r} without a {BEGIN!r} before it")
            begin_indent = _indent(lines[open_at - 1])
            if indent != begin_indent:
                raise RegionError(f"{path}:{number}: {END!r} is indented differently from its {BEGIN!r} at line "
                                  f"{open_at}; put both markers at the indentation of the function body")
            spans.append((open_at, number, indent))
            open_at = None
    if open_at is not None:
        raise RegionError(f"{path}:{open_at}: {BEGIN!r} is never closed; add {END!r} after the region")
    if not spans:
        return []

    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as err:
        raise RegionError(f"{path}:{err.lineno}: not valid Python ({err.msg}); cannot place its regions") from None
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
    regions = []
    for begin, end, indent in spans:
        for number in range(begin + 1, end):
            body_line = lines[number - 1]
            if body_line.strip() and len(_indent(body_line)) < len(indent):
                raise RegionError(f"{path}:{number}: this line of the region opened at line {begin} is indented "
                                  "less than its markers; a region must stay inside one block")
        enclosing = [f for f in functions if f.lineno < begin <= f.end_lineno and len(indent) > f.col_offset]
        if not enclosing:
            raise RegionError(f"{path}:{begin}: solution region outside any function; regions go inside a "
                              "function's body, after its docstring and input validation")
        function = max(enclosing, key=lambda f: f.lineno).name  # the innermost one
        task = task_of_function(function)
        if task is None:
            raise RegionError(f"{path}:{begin}: no task lists {function!r}, the function holding this solution region; "
                              "add it to a task's `functions` in course/tasks.py")
        regions.append(Region(path, function, begin, end, indent, task))
    return regions


def strip_regions(text: str, path: str) -> tuple[str, list[Region]]:
    """`text` with every solution region replaced by its stub, and the regions; raises RegionError if the result
    is not valid Python."""
    regions = find_regions(text, path)
    lines = text.splitlines(keepends=True)
    for region in reversed(regions):
        lines[region.begin - 1 : region.end] = region.stub()
    stripped = "".join(lines)
    if regions:
        try:
            ast.parse(stripped, filename=path)
        except SyntaxError as err:
            raise RegionError(f"{path}:{err.lineno}: replacing the solution regions by a raise leaves invalid Python "
                              f"({err.msg}); a region must span whole statements") from None
    return stripped, regions


def scan_tree(root: Path) -> list[Region]:
    """All solution regions in the packages of the tree at `root` (PACKAGES), in path order."""
    regions = []
    for path in source_files(root):
        rel = path.relative_to(root).as_posix()
        regions += find_regions(path.read_text(), rel)
    return regions


def source_files(root: Path, released: bool = False) -> list[Path]:
    """The Python files of PACKAGES under `root`, sorted, without caches (`released`: without PRIVATE_SOURCES)."""
    files = []
    for package in PACKAGES:
        files += [p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts]
    if released:
        files = [p for p in files if p.relative_to(root).as_posix() not in PRIVATE_SOURCES]
    return sorted(files)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]
