"""Metrics to CSV (always) and TensorBoard (when installed)."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricLogger:
    """Append rows of scalar metrics to `path` (CSV). Columns grow as new keys appear.

    Rows are kept in memory and the file is rewritten on `log`, so the CSV is always complete and readable
    while a run goes on (the metric logs of this package are at most a few thousand rows).
    """

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None, rows: list[dict] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = list(rows or [])
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, step: int, **metrics: float) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        self._write()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)

    def _write(self) -> None:
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def column(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the rows that have `key`."""
        pairs = [(r["step"], r[key]) for r in self.rows if key in r and r[key] != ""]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a metrics CSV as dicts of floats (empty cells dropped)."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
