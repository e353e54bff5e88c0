"""gm.seeds: its config, and the gan_weight it repeats (the one notebook 2_2 found, else 1)."""

import json

import pytest

from gm.seeds import effective_gan_weight, seeds_config


def test_seeds_config_and_the_gan_weight_it_repeats(tmp_path, monkeypatch):
    monkeypatch.setenv("HW3_FIG_DIR", str(tmp_path))
    assert seeds_config("quick").seeds == (0, 1, 2) and seeds_config("smoke").eval_images == 64
    with pytest.raises(ValueError, match="distinct seeds"):
        seeds_config("smoke", seeds=(0, 0))
    with pytest.raises(ValueError, match="gan_weight"):
        seeds_config("smoke", gan_weight=0.0)
    assert effective_gan_weight(seeds_config("smoke")) == 1.0  # no summary yet
    (tmp_path / "part2_summary.json").write_text(json.dumps({"gan": {"smallest_effective_gan_weight": 0.01}}))
    assert effective_gan_weight(seeds_config("smoke")) == 0.01
    assert effective_gan_weight(seeds_config("smoke", gan_weight=0.5)) == 0.5
