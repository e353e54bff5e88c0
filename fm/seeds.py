"""The LM comparisons over training seeds: DPO vs SFT and IPO vs DPO, each (loss, beta) trained once per seed.

One training run per comparison says little when a second seed can move the result by as much as the difference
itself. This module trains `fm.comparisons.compare_preference_losses`' runs (1.3's pairs, steps and lr; the training
seed draws the LoRA initialisation and the batch order) for every seed of `SeedsConfig.seeds`, evaluates each policy
like 1.3's on the same held-out prompts, and reports per setting the mean and spread (max - min) over seeds of the
oracle reward, the KL from SFT, the win rate against SFT and the validation reward accuracy, and, per seed, IPO's
win rate against DPO of the same seed. Runs that 1.3/1.4 already trained (same config) load from their folders.

    python -m fm.seeds --profile quick    # writes fig/seeds_fm.md and fig/seeds_fm.json (`make seeds`)
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import asdict, dataclass

from common import make_config
from common.cli import profile_main, write_fig_pair
from common.config import check
from common.plotting import markdown_table
from fm.comparisons import LOSS_NAMES, compare_preference_losses, lm_enhance_config, seed_spread
from fm.dpo import dpo_config
from fm.dpo_analysis import evaluate_policy
from fm.metrics import DISPLAY_NAMES, win_rate
from fm.preference import chitchat_prompts
from fm.sft import load_or_train_sft


@dataclass
class SeedsConfig:
    """Which preference runs to repeat over which training seeds (`seeds_config(profile)` picks a preset)."""

    profile: str = "quick"  # the DPO profile whose pairs, steps, lr and evaluation prompts every run uses
    variants: tuple[tuple[str, float], ...] = (("dpo", 0.1), ("ipo", 0.1))  # (loss, beta); the first is the baseline
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self):
        check(len(self.seeds) >= 2 and len(set(self.seeds)) == len(self.seeds),
              f"SeedsConfig.seeds must be >= 2 distinct seeds (a spread needs two), got {self.seeds}")
        check(len(self.variants) > 0, "SeedsConfig.variants must name at least one (loss, beta)")


PRESETS = {
    "smoke": dict(profile="smoke", seeds=(0, 1, 2)),
    "quick": dict(profile="quick"),
    "full": dict(profile="full"),
}


def seeds_config(profile: str | None = None, **overrides) -> SeedsConfig:
    """The seeds config of `profile` (default $HW3_PROFILE or quick) with `overrides`."""
    return make_config(SeedsConfig, PRESETS, profile, **overrides)


def run_seeds(cfg: SeedsConfig) -> dict:
    """Train and evaluate every (loss, beta) x seed of `cfg`; returns {"profile", "prompts", "runs": one row per run,
    "spread": `seed_spread` per (loss, beta), "versus_baseline": per other variant and seed, its oracle win rate
    against the first variant of the same seed with the 95 % CI}."""
    dcfg = dpo_config(cfg.profile)
    sft_run = load_or_train_sft(dcfg.sft_profile)
    reference, tokenizer = sft_run.model, sft_run.tokenizer
    prompts = chitchat_prompts("test", dcfg.seed)[: dcfg.eval_prompts]
    sft = evaluate_policy("SFT", reference, reference, tokenizer, prompts, dcfg.reply_tokens, seed=dcfg.seed,
                          batch_size=dcfg.sample_batch_size, cache=True)
    enhance = lm_enhance_config(cfg.profile, variants=cfg.variants, seeds=cfg.seeds, frontier_steps=0,
                                frontier_val_pairs=0)  # 1.3's runs, not the frontier's shorter ones
    result = compare_preference_losses(enhance, sft, prompts, reference, tokenizer)
    evals = dict(zip(((r["loss"], r["beta"], r["seed"]) for r in result.rows), result.evals.values(), strict=True))
    first = (LOSS_NAMES[cfg.variants[0][0]], cfg.variants[0][1])
    versus = []
    for loss, beta, seed in evals:
        if (loss, beta) != first:
            rate, low, high = win_rate(evals[loss, beta, seed].rewards, evals[(*first, seed)].rewards)
            versus.append({"loss": loss, "beta": beta, "seed": seed, "versus": f"{first[0]}, beta={first[1]:g}",
                           "win_rate": rate, "win_ci_low": low, "win_ci_high": high})
    return {"profile": cfg.profile, "config": asdict(cfg), "prompts": len(prompts), "runs": result.rows,
            "spread": seed_spread(result.rows), "versus_baseline": versus}


def write_tables(out: dict) -> str:
    """`fig/seeds_fm.md` (the spread table, the head-to-head win rates with their mean over seeds) and
    `fig/seeds_fm.json` of a `run_seeds` result; returns the markdown."""
    versus = out["versus_baseline"]
    rates = [r["win_rate"] for r in versus]
    head_to_head = markdown_table(versus, names=DISPLAY_NAMES | {"win_rate": "win rate"}) + (
        f"\n\nMean over seeds {statistics.fmean(rates):.3f}, spread {max(rates) - min(rates):.3f}" if rates else "")
    text = (f"Preference runs over training seeds ({out['profile']} profile, {out['prompts']} held-out prompts per "
            f"run): mean and spread (max - min) over seeds\n\n{markdown_table(out['spread'], names=DISPLAY_NAMES)}\n\n"
            f"Head to head on the same prompts, per training seed\n\n{head_to_head}\n")
    return write_fig_pair("seeds_fm", text, out)


def main(argv: list[str] | None = None) -> None:
    """`python -m fm.seeds [--profile quick]`: train, evaluate and write fig/seeds_fm.md / .json."""
    profile_main(argv, __doc__.splitlines()[0], lambda profile: write_tables(run_seeds(seeds_config(profile))))


if __name__ == "__main__":
    sys.exit(main())
