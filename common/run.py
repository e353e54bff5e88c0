"""The one result type of every training run: `Run` (config, folder, model, logged metrics).

Every `train_*` and `load_or_train_*` of the package returns a `Run`, or a subclass that adds what its task keeps
beside the model (the VAE's discriminator, the LDM's EMA copy and VAE, a language model's tokenizer, DPO's
reference). So whatever the task, the trained model is `run.model`, its folder `run.folder` and its curves
`run.train_rows` / `run.eval_rows` (`common.logging.column(run.train_rows, "loss")` gives one curve).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from common.logging import read_csv

ConfigT = TypeVar("ConfigT")
ModelT = TypeVar("ModelT")


@dataclass
class Run(Generic[ConfigT, ModelT]):
    """A finished training run, just trained or loaded from its folder."""

    config: ConfigT  # the run's config dataclass; its training fields name `folder`
    folder: Path  # where the run lives: the saved model, the trainer's CSV logs and checkpoint
    model: ModelT  # the trained model, in eval mode
    train_rows: list[dict]  # the trainer's training rows ({"step": ..., "loss": ...}, one per logged step)
    eval_rows: list[dict]  # its evaluation rows ({"step": ..., "val_loss": ...}); empty without evaluations


def read_logs(folder: str | Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) from the trainer's `train.csv` / `eval.csv` in `folder`; a missing file gives []: a
    run loaded from its saved model reports the curves it was trained with."""
    folder = Path(folder)
    return tuple([] if not (folder / name).is_file() else read_csv(folder / name)  # type: ignore[return-value]
                 for name in ("train.csv", "eval.csv"))
