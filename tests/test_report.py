"""report.md is the current rendering of report/template.md, complete and short; the renderer's directives work.

Word count (the rule README states): whitespace-separated tokens of report.md, not counting table rows (lines that
start with '|') and image lines (lines that start with '!['); `course.report.word_count`. Limit: 8,000.
"""

import json
import re
from pathlib import Path

import pytest

from course.report import ROOT, TEMPLATE, ReportError, json_lookup, render, word_count

REPORT = ROOT / "report.md"
MAX_WORDS = 8000


def _referenced_paths() -> set[str]:
    return set(re.findall(r"\]\((fig/[^)\s]+)\)", REPORT.read_text()))


def test_report_is_the_current_rendering():
    assert REPORT.read_text() == render(TEMPLATE), "report.md is stale: run `python -m course.report`"


def test_report_word_count():
    words = word_count(REPORT.read_text())
    assert 1000 < words <= MAX_WORDS, f"report.md has {words} words (limit {MAX_WORDS})"


def test_report_images_exist():
    missing = sorted(p for p in _referenced_paths() if not (ROOT / p).exists())
    assert not missing, f"report.md references missing files: {missing}"


def test_every_figure_is_referenced():
    pngs = {str(p.relative_to(ROOT)) for p in (ROOT / "fig").glob("*.png")}
    unreferenced = sorted(pngs - _referenced_paths())
    assert not unreferenced, f"fig/ has PNGs that report.md never shows or links: {unreferenced}"


def test_figure_captions_name_the_profile():
    images = re.findall(r"!\[([^\]]*)\]\(fig/", REPORT.read_text())
    unnamed = [c for c in images if not re.search(r"\b(smoke|quick|full) profile\b", c)]
    assert images and not unnamed, f"image captions without their profile: {unnamed}"


def test_no_todo_left():
    assert not re.search(r"\b(TODO|TBD|FIXME)\b", REPORT.read_text()), "report.md still has a TODO/TBD/FIXME"


def test_report_has_every_section():
    text = REPORT.read_text()
    for section in ["1.1", "1.2", "1.3", "1.4", "2.1", "2.2", "2.3", "2.4"]:
        assert re.search(rf"^#+ {re.escape(section)}\b", text, re.M), f"report.md has no section {section}"
    order = [re.search(rf"^#+ {re.escape(s)}\b", text, re.M).start() for s in ["1.1", "1.2", "1.3", "1.4", "2.1",
                                                                                "2.2", "2.3", "2.4"]]
    assert order == sorted(order), "sections are not in the homework's order"
    assert re.search(r"^#+ .*Theory", text, re.M), "report.md has no theory part"


# ------------------------------------------------------------------------------------------- the renderer
@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "fig").mkdir()
    (tmp_path / "report").mkdir()
    (tmp_path / "fig/t.md").write_text("Caption (quick profile)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n\n")
    (tmp_path / "fig/v.json").write_text(json.dumps({"run": {"1e-3": [{"acc": 0.91234}, {"n": 12345}]}, "s": "x"}))
    (tmp_path / "report/inner.md").write_text("inner {{ value: fig/v.json | s }}\n")
    return tmp_path


def _render_text(tree: Path, text: str) -> str:
    (tree / "report/t.md").write_text(text)
    return render("report/t.md", tree)


def test_table_directive_inserts_the_file_without_trailing_newlines(tree):
    assert _render_text(tree, "A\n{{ table: fig/t.md }}\nB\n") == (
        "A\nCaption (quick profile)\n\n| a | b |\n|---|---|\n| 1 | 2 |\nB\n")


def test_value_directive_paths_and_formats(tree):
    text = ("{{ value: fig/v.json | run/1e-3/0/acc | .3f }}, {{value:fig/v.json|run/1e-3/0/acc|.1%}}, "
            "{{ value: fig/v.json | run/1e-3/1/n | ,d }}, {{ value: fig/v.json | run/1e-3/-1/n }}, "
            "{{ value: fig/v.json | s }}\n")
    assert _render_text(tree, text) == "0.912, 91.2%, 12,345, 12345, x\n"
    assert json_lookup({"a.b": [1, {"c": 2}]}, "a.b/1/c") == 2
    row = {"s / step": 4.5, "s ": 0, "tokens / s / GPU": 7}  # table columns: keys with '/', the longest one wins
    assert json_lookup([row], "0/s / step") == 4.5 and json_lookup({"r": row}, "r/tokens / s / GPU") == 7
    with pytest.raises(KeyError, match="no key 'x' at r"):
        json_lookup({"r": row}, "r/x/y")


def test_include_directive_renders_recursively(tree):
    assert _render_text(tree, "x {{ include: report/inner.md }} y\n") == "x inner x y\n"


@pytest.mark.parametrize("text, problem", [
    ("{{ table: fig/missing.md }}", "fig/missing.md"),
    ("{{ value: fig/missing.json | a }}", "fig/missing.json"),
    ("{{ value: fig/v.json | run/1e-4 }}", "no key '1e-4' at run"),
    ("{{ value: fig/v.json | run/1e-3/5/acc }}", "index 5 out of range"),
    ("{{ value: fig/v.json | run/1e-3/x }}", "not an integer index"),
    ("{{ value: fig/v.json | s | .3f }}", "cannot format"),
    ("{{ value: fig/v.json }}", "FILE | KEY/PATH"),
    ("{{ figure: fig/t.md }}", "unknown directive"),
    ("{{ fig/t.md }}", "unknown directive"),
    ("{{ table: fig/t.md", "unterminated"),
    ("{{ include: report/t.md }}", "include cycle"),
])
def test_directive_errors_name_the_line_and_the_problem(tree, text, problem):
    with pytest.raises(ReportError, match=re.escape(problem)) as info:
        _render_text(tree, f"first line\n{text}\n")
    assert str(info.value).startswith("report/t.md:2:"), str(info.value)


def test_errors_inside_an_include_name_the_fragment(tree):
    (tree / "report/inner.md").write_text("ok\n{{ value: fig/v.json | nope }}\n")
    with pytest.raises(ReportError, match=r"report/inner.md:2: value: no key 'nope'"):
        _render_text(tree, "{{ include: report/inner.md }}\n")


def test_word_count_skips_tables_and_images():
    text = "Two words\n| a | b | c |\n|---|---|\n![a caption of many words](fig/x.png)\nthree more words\n"
    assert word_count(text) == 5


def test_cli_check_flags_a_stale_report_and_skips_a_student_release(tree, monkeypatch, capsys):
    from course import report
    (tree / "report/template.md").write_text("n = {{ value: fig/v.json | run/1e-3/1/n | ,d }}\n")
    monkeypatch.setattr(report, "ROOT", tree)
    assert report.main([]) == 0 and (tree / "report.md").read_text() == "n = 12,345\n"
    assert report.main(["--check"]) == 0
    (tree / "report.md").write_text("n = 1\n")
    assert report.main(["--check"]) == 1 and "+n = 12,345" in capsys.readouterr().out
    (tree / "report/template.md").unlink()
    assert report.main([]) == 2  # a missing template is an error in the solution tree
    (tree / report.MARKER).write_text("release\n")
    assert report.main([]) == 0 and "student release" in capsys.readouterr().out
