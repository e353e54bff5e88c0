"""Execute notebooks headless, in order, in one profile: `python -m course.run_notebooks [NAME ...] [--profile P]`.

Each notebook runs in a fresh kernel with HW3_PROFILE set. While it runs, the runner prints which cell is running
and the notebook's own printed output (prints, warnings, the trainer's evaluation lines) as it arrives. A failing
cell stops the run with the notebook's name, the cell's index and its source; the wall time of every notebook is
printed and recorded in `fig/notebook_times_<profile>.md` (quick and full): a notebook's row is replaced by its latest
run, the other rows are kept, and the total is their sum.

A notebook that runs through but shows its results badly fails too (`output_problems`): a PNG saved to fig/ that no
cell displays, an output that links to a file (the browser cannot fetch it from JupyterLab), or a stray return value
(a path, or the byte count of `write_text`) at the end of a cell.

`--from NAME` restarts the sequence at notebook NAME (e.g. after an interrupted `make figures PROFILE=full`);
training runs that finished before load their checkpoints instead of training again.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from common.notebook import png_snapshot, saved_since
from common.paths import fig_dir, repo_root
from common.profile import PROFILES

NOTEBOOK_DIR = repo_root() / "notebooks"
# ipykernel logs this at every start when it talks over local TCP (the default); it says nothing about the notebook.
TRANSPORT_WARNING = "Kernel is running over TCP without encryption"


# a markdown image or an HTML <img> whose source is a file, not embedded data or a web address
FILE_LINK = re.compile(r"!\[[^\]]*\]\((?!data:|https?://)[^)]+\)|<img[^>]*\ssrc=[\"'](?!data:|https?://)", re.I)
STRAY_RESULT = re.compile(r"^((Posix|Windows)?Path\(.*\)|\d+)$", re.S)


class NotebookError(RuntimeError):
    pass


def displayed_png_digests(notebook: nbformat.NotebookNode) -> set[str]:
    """SHA-256 of every PNG shown in the notebook's outputs."""
    return {hashlib.sha256(base64.b64decode(out["data"]["image/png"])).hexdigest()
            for cell in notebook.cells for out in cell.get("outputs", ()) if "image/png" in out.get("data", {})}


def output_problems(notebook: nbformat.NotebookNode, saved: list[Path]) -> list[str]:
    """What an executed notebook shows badly: PNGs in `saved` (written to fig/ by the run) that no output shows byte
    for byte, outputs that link to a file, and cells ending in a stray path or byte count."""
    shown = displayed_png_digests(notebook)
    problems = [f"saves {p.name} to fig/ but never displays it (run `setup_notebook()` in the first cell, or show it "
                f"with IPython.display.Image(filename=...))"
                for p in saved if hashlib.sha256(p.read_bytes()).hexdigest() not in shown]
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    for number, cell in enumerate(code_cells, start=1):
        for out in cell.get("outputs", ()):
            data = out.get("data", {})
            for mime in ("text/markdown", "text/html"):
                if mime in data and FILE_LINK.search(data[mime]):
                    problems.append(f"code cell {number} displays a link to a file ({FILE_LINK.search(data[mime])[0]}"
                                    f"...): embed the image with IPython.display.Image(filename=...)")
            if out.get("output_type") == "execute_result" and STRAY_RESULT.match(data.get("text/plain", "")):
                problems.append(f"code cell {number} ends with a stray return value {data['text/plain'][:60]}: end "
                                "that line with ';' or assign its value")
    return problems


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


def notebooks_from(name: str) -> list[Path]:
    """The notebooks of the full sequence, from notebook `name` (see `resolve`) to the last."""
    start = resolve(name)
    notebooks = list_notebooks()
    if start not in notebooks:
        raise NotebookError(f"--from {name!r}: {start} is not one of the notebooks in {NOTEBOOK_DIR}")
    return notebooks[notebooks.index(start) :]


class _EchoingClient(NotebookClient):
    """A NotebookClient that prints each code cell's start and the notebook's stream output as it arrives."""

    def __init__(self, notebook: nbformat.NotebookNode, echo: bool, **kwargs: Any):
        super().__init__(notebook, **kwargs)
        self.echo, self.start_time = echo, time.perf_counter()
        self.code_cells = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
        if echo:
            self.on_cell_start = self._announce

    def _announce(self, cell: nbformat.NotebookNode, cell_index: int) -> None:
        if cell_index in self.code_cells:
            seconds = time.perf_counter() - self.start_time
            print(f"-- cell {self.code_cells.index(cell_index) + 1}/{len(self.code_cells)} "
                  f"(index {cell_index}, {seconds:.0f} s)", flush=True)

    def output(self, outs: list, msg: dict, display_id: str | None, cell_index: int):
        if self.echo and msg["msg_type"] == "stream":
            stream = sys.stderr if msg["content"]["name"] == "stderr" else sys.stdout
            stream.write(msg["content"]["text"])
            stream.flush()
        return super().output(outs, msg, display_id, cell_index)


def _relay_kernel_stderr(fd: int) -> None:
    """Copy the kernel process's own stderr (C-level messages, kernel logs) to ours, minus TRANSPORT_WARNING."""
    with open(fd, encoding="utf-8", errors="replace") as pipe:
        for line in pipe:
            if TRANSPORT_WARNING not in line:
                sys.stderr.write(line)
                sys.stderr.flush()


def run_notebook(path: Path, profile: str, timeout: int = 3600, echo: bool = False, save_to: Path | None = None
                 ) -> float:
    """Execute `path` in memory (the file on disk stays without outputs); returns wall seconds.

    With `echo`, prints each code cell's start and the notebook's printed output while it runs. With `save_to`, the
    executed notebook (outputs up to a failing cell included) is written there, whether the run succeeds or not.
    """
    notebook = nbformat.read(path, as_version=4)
    os.environ["HW3_PROFILE"] = profile  # the kernel inherits this process's environment
    resources = {"metadata": {"path": str(path.parent)}}  # cwd of the kernel: notebooks/
    client = _EchoingClient(notebook, echo, timeout=timeout, kernel_name="python3", resources=resources)
    read_end, write_end = os.pipe()
    relay = threading.Thread(target=_relay_kernel_stderr, args=(read_end,), daemon=True)
    relay.start()
    before = png_snapshot(fig_dir())
    start = time.perf_counter()
    try:
        client.execute(stderr=write_end)  # passed on to the kernel's Popen
    except CellExecutionError as err:
        cells = notebook.cells
        failed = [i for i, c in enumerate(cells) if any(o.output_type == "error" for o in c.get("outputs", ()))]
        index = failed[0] if failed else None
        source = notebook.cells[index].source if failed else "?"
        raise NotebookError(f"notebook {path.name} failed in cell {index}:\n{source}\n\n{err}") from None
    finally:
        os.close(write_end)  # the kernel has exited: the relay reads to the end of the pipe and stops
        relay.join(timeout=5)
        if save_to is not None:
            nbformat.write(notebook, save_to)
    seconds = time.perf_counter() - start
    problems = output_problems(notebook, saved_since(before, png_snapshot(fig_dir())))
    if problems:
        raise NotebookError(f"notebook {path.name} ran, but:\n  - " + "\n  - ".join(problems))
    return seconds


def read_times(path: Path) -> dict[str, float]:
    """The {notebook name: seconds} rows of a times table written by `record_times` (empty if there is none)."""
    if not path.is_file():
        return {}
    rows = (line.strip("|").split("|") for line in path.read_text().splitlines() if line.startswith("| "))
    return {n.strip(): float(t) for n, t in rows if n.strip().endswith(".ipynb")}


def record_times(path: Path, times: list[tuple[str, float]]) -> None:
    """Merge `times` [(notebook name, seconds)] into the table at `path` (.md), in notebook order, with their total;
    the same numbers go to the .json beside it."""
    merged = read_times(path) | dict(times)
    names = [p.name for p in list_notebooks() if p.name in merged]
    lines = ["| notebook | wall time (s) |", "|---|---|"] + [f"| {n} | {merged[n]:.0f} |" for n in names]
    lines.append(f"| total | {sum(merged[n] for n in names):.0f} |")
    path.write_text("\n".join(lines) + "\n")
    seconds = {n: round(merged[n], 1) for n in names} | {"total": round(sum(merged[n] for n in names), 1)}
    path.with_suffix(".json").write_text(json.dumps(seconds, indent=2) + "\n")  # the report quotes these


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all, in order)")
    parser.add_argument("--profile", default=os.environ.get("HW3_PROFILE", "quick"), choices=PROFILES)
    parser.add_argument("--from", dest="start", metavar="NAME",
                        help="run the sequence from notebook NAME (a name prefix such as 2_1) to the last")
    args = parser.parse_args(argv)
    if args.start and args.names:
        parser.error("give notebook names or --from NAME, not both")
    try:
        paths = notebooks_from(args.start) if args.start else [resolve(n) for n in args.names] or list_notebooks()
    except NotebookError as err:
        print(err, file=sys.stderr)
        return 2
    times = []
    for path in paths:
        print(f"== running {path.name} (profile {args.profile})", flush=True)
        try:
            seconds = run_notebook(path, args.profile, echo=True)
        except NotebookError as err:
            print(err, file=sys.stderr)
            if not args.names:
                print(f"== to restart the sequence here: make figures PROFILE={args.profile} FROM={path.stem}",
                      file=sys.stderr)
            return 1
        times.append((path.name, seconds))
        print(f"== {path.name}: {seconds:.1f} s", flush=True)
    total = sum(s for _, s in times)
    print(f"== {len(times)} notebooks: {total:.1f} s")
    if args.profile != "smoke":
        record_times(fig_dir() / f"notebook_times_{args.profile}.md", times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
