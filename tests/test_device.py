"""HW3_NUM_THREADS is the one switch for torch's CPU threads, applied when `common` is imported."""

import os
import subprocess
import sys

import pytest
import torch

from common.device import apply_num_threads


def test_num_threads_is_applied_on_import_of_common():
    env = {**os.environ, "HW3_NUM_THREADS": "1", "OMP_NUM_THREADS": "2"}
    code = "import torch; before = torch.get_num_threads(); import common; print(before, torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2", "1"]


def test_num_threads_unset_or_bad(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.delenv("HW3_NUM_THREADS", raising=False)
    assert apply_num_threads() is None and torch.get_num_threads() == threads
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("HW3_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="HW3_NUM_THREADS must be a positive integer"):
            apply_num_threads()
    assert torch.get_num_threads() == threads
