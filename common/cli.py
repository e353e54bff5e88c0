"""What the report scripts share (`python -m fm.seeds`, `python -m gm.seeds`): their `--profile` command line and
the fig/ pair they write, a markdown table for the report and the JSON of the numbers behind it."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence

from common.paths import fig_dir


def write_fig_pair(name: str, text: str, data: dict) -> str:
    """Write `text` to `fig/<name>.md` and `data` to `fig/<name>.json` (values JSON has no type for as strings);
    returns `text`."""
    (fig_dir() / f"{name}.md").write_text(text)
    (fig_dir() / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    return text


def profile_main(argv: Sequence[str] | None, description: str, run: Callable[[str | None], str]) -> None:
    """`[--profile smoke|quick|full]` from `argv`, then print `run(profile)` (the markdown the script wrote);
    no --profile passes None: $HW3_PROFILE or quick."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--profile", default=None, help="smoke | quick | full (default: $HW3_PROFILE or quick)")
    print(run(parser.parse_args(argv).profile))
