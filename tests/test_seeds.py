"""fm.seeds: the preference runs repeated over training seeds, on the smoke profile's tiny models."""

import json

import pytest


@pytest.mark.slow
def test_seeds_smoke_run_reports_every_seed_and_the_spread():
    from common import fig_dir
    from fm.seeds import main, seeds_config

    main(["--profile", "smoke"])
    out = json.loads((fig_dir() / "seeds_fm.json").read_text())
    assert [(r["loss"], r["seeds"]) for r in out["spread"]] == [("DPO", 3), ("IPO", 3)]
    assert sorted(r["seed"] for r in out["runs"] if r["loss"] == "IPO") == [0, 1, 2]
    for row in out["spread"]:  # the spread is the range of the per-seed values
        values = [r["reward"] for r in out["runs"] if r["loss"] == row["loss"]]
        assert row["reward_spread"] == pytest.approx(max(values) - min(values))
    assert len(out["versus_baseline"]) == 3 and all(0 <= r["win_rate"] <= 1 for r in out["versus_baseline"])
    assert "Head to head" in (fig_dir() / "seeds_fm.md").read_text()
    with pytest.raises(ValueError, match="at least|>= 2 distinct"):
        seeds_config("smoke", seeds=(0,))
