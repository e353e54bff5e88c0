"""What each notebook's first cell sets up: `setup_notebook()`, after `%autoreload 2`.

- **The package of the notebook's own tree.** A kernel registered by another checkout (its `.venv`, its editable
  install) would import that checkout's `common`, `fm` and `gm`, and run its code instead of this tree's. The cell
  stops with both trees named.
- **Figures inline and on disk.** Every PNG a cell saves to `fig/` (library code, pyplot, PIL alike) is shown below
  that cell, embedded from the file with `IPython.display.Image`. What the student sees is byte for byte the figure
  the report includes, and no output links to a file that the browser cannot fetch. This is a `post_run_cell`
  hook, as matplotlib's inline backend shows pyplot's figures in a `post_execute` one.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.paths import fig_dir, repo_root

Snapshot = dict[Path, tuple[int, int]]  # PNG path -> (mtime_ns, size)


class TreeMismatchError(ImportError):
    """The kernel imports the package from another tree than the notebook's own."""


def notebook_tree(start: Path) -> Path | None:
    """The hw3 tree that holds the folder `start` (a notebook's working directory), or None outside any."""
    for folder in (start, *start.parents):
        if (folder / "common" / "__init__.py").is_file() and (folder / "notebooks").is_dir():
            return folder
    return None


def check_tree(cwd: Path) -> None:
    """Raise TreeMismatchError when the notebook in `cwd` belongs to a tree other than the imported package's."""
    own, imported = notebook_tree(cwd.resolve()), repo_root()
    if own is not None and own.resolve() != imported.resolve():
        raise TreeMismatchError(
            f"this notebook belongs to {own}, but the kernel imports the package from {imported}. The kernel is "
            f"another checkout's. Start JupyterLab with `make lab` in {own} (its kernel 'hw3' imports that tree), "
            f"or run `make kernel` there to register it for your user."
        )


def png_snapshot(folder: Path) -> Snapshot:
    """(mtime_ns, size) of every PNG directly in `folder`."""
    if not folder.is_dir():
        return {}
    return {p: (s.st_mtime_ns, s.st_size) for p in folder.glob("*.png") if (s := p.stat())}


def saved_since(before: Snapshot, after: Snapshot) -> list[Path]:
    """PNGs that are new or rewritten in `after`, in the order they were written."""
    return sorted((p for p, stamp in after.items() if before.get(p) != stamp), key=lambda p: after[p][0])


class FigureDisplay:
    """IPython hooks: before a cell, note fig/'s PNGs; after it, show the ones the cell wrote."""

    def __init__(self) -> None:
        self.before: Snapshot = {}

    def pre_run_cell(self, info: object = None) -> None:
        self.before = png_snapshot(fig_dir())

    def post_run_cell(self, result: object = None) -> None:
        from IPython.display import Image, display

        for path in saved_since(self.before, png_snapshot(fig_dir())):
            display(Image(filename=str(path)))
        self.before = {}


def setup_notebook() -> None:
    """Check the tree, then show every figure a cell saves to fig/ below that cell. Idempotent: a re-run of the
    first cell replaces the hooks instead of adding a second set."""
    check_tree(Path(os.getcwd()))
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:  # a plain Python process: nothing to show figures in
        return
    old = getattr(shell, "_hw3_figure_display", None)
    if old is not None:
        shell.events.unregister("pre_run_cell", old.pre_run_cell)
        shell.events.unregister("post_run_cell", old.post_run_cell)
    hooks = shell._hw3_figure_display = FigureDisplay()
    hooks.before = png_snapshot(fig_dir())  # this cell's post_run_cell runs too: show nothing saved before it
    shell.events.register("pre_run_cell", hooks.pre_run_cell)
    shell.events.register("post_run_cell", hooks.post_run_cell)
