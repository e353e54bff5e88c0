"""report.md is complete: its images exist, every figure is used, nothing is left to do, every notebook is run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "report.md"


def _referenced_paths() -> set[str]:
    text = REPORT.read_text()
    return set(re.findall(r"\]\((fig/[^)\s]+)\)", text))


def test_report_images_exist():
    missing = sorted(p for p in _referenced_paths() if not (ROOT / p).exists())
    assert not missing, f"report.md references missing files: {missing}"


def test_every_figure_is_referenced():
    pngs = {str(p.relative_to(ROOT)) for p in (ROOT / "fig").glob("*.png")}
    unreferenced = sorted(pngs - _referenced_paths())
    assert not unreferenced, f"fig/ has PNGs that report.md never shows or links: {unreferenced}"


def test_no_todo_left():
    text = REPORT.read_text()
    assert not re.search(r"\b(TODO|TBD|FIXME)\b", text), "report.md still has a TODO/TBD/FIXME"


def test_report_has_every_section():
    text = REPORT.read_text()
    for section in ["1.1", "1.2", "1.3", "1.4", "2.1", "2.2", "2.3", "2.4"]:
        assert re.search(rf"^#+ {re.escape(section)}\b", text, re.M), f"report.md has no section {section}"
