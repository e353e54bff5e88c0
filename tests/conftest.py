"""Tests never touch the network and never overwrite the report's figures or checkpoints."""

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["HW3_PROFILE"] = "smoke"


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path_factory, monkeypatch):
    """Figures and checkpoints of a test go to a temporary folder."""
    root = tmp_path_factory.mktemp("outputs")
    monkeypatch.setenv("HW3_FIG_DIR", str(root / "fig"))
    monkeypatch.setenv("HW3_CKPT_DIR", str(root / "checkpoints"))
