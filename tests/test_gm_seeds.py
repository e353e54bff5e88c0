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


@pytest.mark.slow
def test_seeds_smoke_run_repeats_every_quantity_per_seed():
    from common import fig_dir
    from gm.seeds import run_seeds, write_tables

    out = run_seeds(seeds_config("smoke", ldm_datasets=("mnist",), eval_images=16))
    quantities = [r["quantity"] for r in out["spread"]]
    assert len(quantities) == 6 and len(out["rows"]) == 2 * 6  # 2 measures x 2 gan_weights + 2 etas, per seed
    assert {r["seed"] for r in out["rows"]} == {0, 1} and all(r["seeds"] == 2 for r in out["spread"])
    for row in out["spread"]:  # the spread is the range of the per-seed values
        values = [r["value"] for r in out["rows"] if r["quantity"] == row["quantity"]]
        assert row["spread"] == pytest.approx(max(values) - min(values))
        assert row["mean"] == pytest.approx(sum(values) / 2)
    text = write_tables(out)
    assert (fig_dir() / "seeds_gm.md").read_text() == text and "gan_weight 1" in text
    assert json.loads((fig_dir() / "seeds_gm.json").read_text())["gan_weight"] == 1.0
