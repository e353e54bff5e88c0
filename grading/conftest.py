"""The graded tests run offline, in the smoke profile, seeded, with every output in a temporary folder, on the code
of the tree that holds this folder (never an installed copy of the package)."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ["HW3_PROFILE"] = "smoke"

import torch  # noqa: E402

TREE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TREE))  # the graded tree's packages come first, from wherever pytest is started


def pytest_sessionstart(session):
    import common
    import fm
    import gm

    for package in (common, fm, gm):
        where = Path(package.__file__).resolve()
        if not where.is_relative_to(TREE):
            raise pytest.UsageError(f"{package.__name__} was imported from {where}, not from the graded tree {TREE}: "
                                    "another copy was imported first; the graded tests must run this tree's code")


@pytest.fixture(autouse=True)
def _isolated_and_seeded(tmp_path, monkeypatch):
    for name, sub in (("HW3_FIG_DIR", "fig"), ("HW3_CKPT_DIR", "checkpoints"), ("HW3_CACHE_DIR", "cache")):
        monkeypatch.setenv(name, str(tmp_path / sub))
    torch.manual_seed(0)
