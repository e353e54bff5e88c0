"""Execute notebooks headless, in order, in one profile: `python -m common.run_notebooks [NAME ...] [--profile P]`.

Each notebook runs in a fresh kernel with HW3_PROFILE set. A failing cell stops the run with the notebook's
name, the cell's index and its source; the wall time of every notebook is printed (and written to
`fig/notebook_times_<profile>.md` for the report when all notebooks of the profile ran).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from common.paths import fig_dir, repo_root
from common.profile import PROFILES

NOTEBOOK_DIR = repo_root() / "notebooks"


class NotebookError(RuntimeError):
    pass


def list_notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def resolve(name: str) -> Path:
    """A notebook by path, file name, or unique prefix of its name (e.g. `2_1`)."""
    path = Path(name)
    if path.suffix == ".ipynb" and path.exists():
        return path.resolve()
    matches = [p for p in list_notebooks() if p.name.startswith(name)]
    if len(matches) != 1:
        names = ", ".join(p.name for p in list_notebooks())
        raise NotebookError(f"{name!r} matches {len(matches)} notebooks; available: {names}")
    return matches[0]


def run_notebook(path: Path, profile: str, timeout: int = 3600) -> float:
    """Execute `path` in memory (the file on disk stays without outputs); returns wall seconds."""
    notebook = nbformat.read(path, as_version=4)
    os.environ["HW3_PROFILE"] = profile  # the kernel inherits this process's environment
    resources = {"metadata": {"path": str(path.parent)}}  # cwd of the kernel: notebooks/
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources=resources)
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as err:
        cells = notebook.cells
        failed = [i for i, c in enumerate(cells) if any(o.output_type == "error" for o in c.get("outputs", ()))]
        index = failed[0] if failed else None
        source = notebook.cells[index].source if failed else "?"
        raise NotebookError(f"notebook {path.name} failed in cell {index}:\n{source}\n\n{err}") from None
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all, in order)")
    parser.add_argument("--profile", default=os.environ.get("HW3_PROFILE", "quick"), choices=PROFILES)
    args = parser.parse_args(argv)
    paths = [resolve(n) for n in args.names] if args.names else list_notebooks()
    times = []
    for path in paths:
        print(f"== running {path.name} (profile {args.profile})", flush=True)
        try:
            seconds = run_notebook(path, args.profile)
        except NotebookError as err:
            print(err, file=sys.stderr)
            return 1
        times.append((path.name, seconds))
        print(f"== {path.name}: {seconds:.1f} s", flush=True)
    total = sum(s for _, s in times)
    print(f"== all {len(times)} notebooks: {total:.1f} s")
    if not args.names and args.profile != "smoke":
        lines = ["| notebook | wall time (s) |", "|---|---|"] + [f"| {n} | {s:.0f} |" for n, s in times]
        lines.append(f"| total | {total:.0f} |")
        (fig_dir() / f"notebook_times_{args.profile}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
