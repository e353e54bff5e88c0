"""Render report.md from report/template.md and the files the notebooks write to fig/.

    python -m course.report           # writes report.md
    python -m course.report --check   # exit 1, with a short diff, when report.md is not the current rendering

The template is markdown with three directives, each inside `{{ ... }}` on one line:

- `{{ table: fig/NAME.md }}`: that file's text (caption line and markdown table), trailing newlines stripped;
- `{{ value: fig/NAME.json | key/0/key | FORMAT }}`: the JSON value at that path ('/'-separated; an integer indexes
  a list; keys may contain dots), formatted with Python's format spec FORMAT (`.3f`, `.1%`, `,d`); without FORMAT,
  `str(value)`;
- `{{ include: report/NAME.md }}`: that fragment, itself rendered.

Paths are relative to the repository root. A missing file or key, a bad format or an unknown directive raises
`ReportError` naming the file, the line and the problem, so a report never renders with a hole in it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Any

from course.release import MARKER

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path("report/template.md")
REPORT = Path("report.md")
DIRECTIVE = re.compile(r"\{\{(.*?)\}\}")
KINDS = ("table", "value", "include")


class ReportError(ValueError):
    """A template that cannot be rendered: the message names the file, line and problem."""


def json_lookup(data: Any, key_path: str) -> Any:
    """The value at `key_path` ('a/b/0/c') in parsed JSON `data`; KeyError/IndexError naming the missing step.

    A key that itself contains '/' (e.g. 's / step', a table column) is matched whole: at each object the longest run
    of the remaining steps that is one of its keys is taken."""
    value, steps, done = data, key_path.split("/"), 0
    while done < len(steps):
        where = "/".join(steps[:done]) or "<root>"
        key = steps[done]
        if isinstance(value, list):
            if not re.fullmatch(r"-?\d+", key):
                raise KeyError(f"{where} is a list; {key!r} is not an integer index")
            if not -len(value) <= int(key) < len(value):
                raise IndexError(f"index {key} out of range at {where} (length {len(value)})")
            value, done = value[int(key)], done + 1
        elif isinstance(value, dict):
            n = next((n for n in range(len(steps) - done, 0, -1) if "/".join(steps[done : done + n]) in value), 0)
            if n == 0:
                keys = ", ".join(map(repr, list(value)[:12]))
                raise KeyError(f"no key {key!r} at {where} (keys: {keys})")
            value, done = value["/".join(steps[done : done + n])], done + n
        else:
            raise KeyError(f"{where} is a {type(value).__name__}, not an object or list; cannot take {key!r}")
    return value


def _read(root: Path, rel: str) -> str:
    path = root / rel
    if not rel or not path.is_file():
        raise FileNotFoundError(f"file {rel!r} does not exist (looked for {path})")
    return path.read_text()


def _directive(kind: str, arg: str, root: Path, stack: tuple[str, ...]) -> str:
    if kind == "table":
        return _read(root, arg).rstrip("\n")
    if kind == "include":
        if arg in stack:
            raise RecursionError(f"include cycle: {' -> '.join((*stack, arg))}")
        return render(arg, root, stack).rstrip("\n")
    parts = [p.strip() for p in arg.split("|")]
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise ValueError(f"value needs 'FILE | KEY/PATH' or 'FILE | KEY/PATH | FORMAT', got {arg!r}")
    rel, key_path, spec = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
    try:
        data = json.loads(_read(root, rel))
    except json.JSONDecodeError as e:
        raise ValueError(f"{rel} is not valid JSON: {e}") from None
    value = json_lookup(data, key_path)
    if not spec:
        return str(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot format {rel} | {key_path} = {value!r} with {spec!r}: {e}") from None


def render(template: str | Path, root: Path = ROOT, stack: tuple[str, ...] = ()) -> str:
    """The rendered text of `template` (a path relative to `root`, or absolute)."""
    rel = str(template)
    if not stack and not (root / rel).is_file():
        raise ReportError(f"template {rel!r} does not exist (looked for {root / rel})")
    text = _read(root, rel)
    stack = (*stack, rel)
    out = []
    for lineno, line in enumerate(text.splitlines(keepends=True), start=1):
        def replace(match: re.Match, lineno: int = lineno) -> str:
            kind, sep, arg = match.group(1).partition(":")
            kind = kind.strip()
            if not sep or kind not in KINDS:
                raise ReportError(f"{rel}:{lineno}: unknown directive {match.group(0)!r}; use one of {KINDS}")
            try:
                return _directive(kind, arg.strip(), root, stack)
            except ReportError:
                raise
            except (OSError, KeyError, IndexError, ValueError, RecursionError) as e:
                message = e.args[0] if isinstance(e, KeyError) and e.args else e
                raise ReportError(f"{rel}:{lineno}: {kind}: {message}") from None

        if "{{" in DIRECTIVE.sub("", line):
            raise ReportError(f"{rel}:{lineno}: unterminated '{{{{' (a directive must close on its own line)")
        out.append(DIRECTIVE.sub(replace, line))
    return "".join(out)


def word_count(text: str) -> int:
    """Whitespace-separated tokens of `text`, not counting table rows (lines starting with '|') and image lines
    (lines starting with '![')."""
    kept = [line for line in text.splitlines() if not line.lstrip().startswith(("|", "!["))]
    return sum(len(line.split()) for line in kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when report.md differs from the rendering")
    parser.add_argument("--template", default=str(TEMPLATE), help="template, relative to the repository root")
    parser.add_argument("--out", default=str(REPORT), help="output, relative to the repository root")
    args = parser.parse_args(argv)
    if (ROOT / MARKER).is_file() and not (ROOT / args.template).is_file():
        print(f"course.report: no {args.template} in the student release; report.md is written by hand")
        return 0
    try:
        text = render(args.template, ROOT)
    except ReportError as e:
        print(f"course.report: {e}", file=sys.stderr)
        return 2
    out = ROOT / args.out
    if args.check:
        current = out.read_text() if out.is_file() else ""
        if current == text:
            print(f"{args.out} is up to date ({word_count(text)} words)")
            return 0
        diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(), f"{args.out} (committed)",
                                         f"{args.out} (rendered)", lineterm="", n=1))
        print("\n".join(diff[:40] + ([f"... {len(diff) - 40} more diff lines"] if len(diff) > 40 else [])))
        print(f"{args.out} is stale: run `python -m course.report`", file=sys.stderr)
        return 1
    out.write_text(text)
    print(f"wrote {args.out} ({word_count(text)} words)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
