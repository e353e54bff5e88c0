"""The leak audit of the student release: no shipped file may repeat a solution region's code.

A leak is two consecutive statement lines of a solution region (blank and comment lines skipped, whitespace
stripped) that appear as two consecutive statement lines of a shipped `.py`, `.ipynb` (cell sources) or `.md`
file. `make student` runs it on the release before writing it and refuses to write a release with a leak, naming
the region and the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from course.regions import Region

SUFFIXES = (".py", ".ipynb", ".md")


@dataclass(frozen=True)
class Leak:
    region: Region
    file: str  # relative to the release's root
    line: int  # 1-based line (of the file, or of the notebook's cells joined) where the two lines start
    lines: tuple[str, str]

    def __str__(self) -> str:
        return (f"{self.file}:{self.line} repeats two lines of the solution of {self.region.function} "
                f"({self.region.path}:{self.region.begin}, task {self.region.task.id}): {self.lines[0]!r} / "
                f"{self.lines[1]!r}")


def statements(lines: list[str]) -> list[tuple[int, str]]:
    """(1-based line, stripped text) of the lines that hold code: no blank lines, comments or fences."""
    kept = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if text and not text.startswith(("#", "```")):
            kept.append((number, text))
    return kept


def region_pairs(region: Region, source: str) -> set[tuple[str, str]]:
    """The region's pairs of consecutive statement lines."""
    body = statements(source.splitlines()[region.begin : region.end - 1])
    return {(a, b) for (_, a), (_, b) in zip(body, body[1:], strict=False)}


def file_lines(path: Path) -> list[str]:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text()).get("cells", [])
        return [line for cell in cells for line in "".join(cell.get("source", "")).splitlines()]
    return path.read_text(errors="replace").splitlines()


def find_leaks(release: Path, regions: list[Region], root: Path) -> list[Leak]:
    """Every leak of the regions (of the tree at `root`) into the files under `release`."""
    sources: dict[str, str] = {}
    pairs: dict[tuple[str, str], Region] = {}
    for region in regions:
        source = sources.setdefault(region.path, (root / region.path).read_text())
        for pair in region_pairs(region, source):
            pairs.setdefault(pair, region)
    leaks = []
    for path in sorted(p for p in release.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
        code = statements(file_lines(path))
        for (number, a), (_, b) in zip(code, code[1:], strict=False):
            if (a, b) in pairs:
                leaks.append(Leak(pairs[(a, b)], path.relative_to(release).as_posix(), number, (a, b)))
    return leaks
