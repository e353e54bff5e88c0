"""Where things live. Every location can be moved with an environment variable.

HW3_DATA_DIR  read-only input data (default: `../shared/data` beside the repository when it exists, else `data/`)
HW3_CACHE_DIR writable cache of decoded data sets (default `.cache/`, git-ignored)
HW3_CKPT_DIR  checkpoints and run logs (default `checkpoints/`, git-ignored)
HW3_FIG_DIR   figures and tables for the report (default `fig/`)
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _dir(env: str, default: str, create: bool) -> Path:
    path = Path(os.environ.get(env) or repo_root() / default).expanduser().resolve()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """$HW3_DATA_DIR, else the course's shared `../shared/data` beside the repository, else `data/` in it.

    Resolved from the package's location, never the working directory, so `make`, a JupyterLab started in any
    folder and a script all read the same data.
    """
    if os.environ.get("HW3_DATA_DIR"):
        return _dir("HW3_DATA_DIR", "data", create=False)
    shared = repo_root().parent / "shared" / "data"
    return shared.resolve() if shared.is_dir() else repo_root() / "data"


def cache_dir() -> Path:
    return _dir("HW3_CACHE_DIR", ".cache", create=True)


def checkpoint_dir() -> Path:
    return _dir("HW3_CKPT_DIR", "checkpoints", create=True)


def fig_dir() -> Path:
    return _dir("HW3_FIG_DIR", "fig", create=True)
