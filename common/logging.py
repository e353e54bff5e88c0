"""Metrics to CSV (always) and TensorBoard (when installed)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from common.io import atomic_path


class MetricLogger:
    """Rows of scalar metrics in memory and in the CSV file `path`; columns grow as new keys appear.

    `log` appends one line to the file, so a run of n rows costs O(n) in total; the file is rewritten (through a
    temporary file and an atomic rename) only when a row brings a new column, or when `restore` replaces the rows
    on resume. Either way the CSV is always complete and readable while a run goes on, and equals `rows`.
    """

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None, rows: Sequence[dict] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = list(rows)
        self.columns: list[str] = []
        self._written = False  # whether the file on disk holds `rows` (a stale file of an earlier run is replaced)
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, step: int, **metrics: float) -> None:
        """Add the row {"step": step, **metrics}; values are numbers or one-element tensors (made Python floats)."""
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        if self._written and row.keys() <= set(self.columns):
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)
        else:
            self._rewrite()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step":
                    self._tb.add_scalar(key, value, step)

    def restore(self, rows: Sequence[dict]) -> None:
        """Replace the rows (e.g. with those of a checkpoint) and rewrite the file to match them."""
        self.rows = list(rows)
        self._rewrite()

    def _rewrite(self) -> None:
        self.columns = list(dict.fromkeys(k for row in self.rows for k in row))
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:  # a reader never sees half a file
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        self._written = True

    def column(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the rows that have `key`."""
        return column(self.rows, key)


def column(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the log rows that have `key` (a CSV's empty cell counts as missing)."""
    pairs = [(r["step"], r[key]) for r in rows if key in r and r[key] != ""]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the up to `window - 1` values before it (the first ones average fewer): the smoothing
    of noisy per-step curves."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return [sum(values[max(0, i + 1 - window) : i + 1]) / min(i + 1, window) for i in range(len(values))]


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a metrics CSV as dicts of floats (empty cells dropped)."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
