"""Part Two's headline comparisons over training seeds: gan_weight 0 vs the smallest effective gan_weight (2.2),
deterministic vs stochastic DDIM (2.4) and the LDM's conditional accuracy (2.3), each setting trained once per seed.

Every result of the notebooks comes from one training seed; a second seed can move a number by as much as the
difference it is meant to show. For every seed of `SeedsConfig.seeds` this module trains (or loads, when a notebook
already trained the same config) the notebooks' runs with only `seed` changed and measures them like the notebooks:

- 2.2: the 2.1 CIFAR-10 VAE (kl_weight 1e-3) of the seed, then its adversarial phase at gan_weight 0 and at
  `gan_weight` (default: `gan.smallest_effective_gan_weight` of fig/part2_summary.json, else 1); perceptual distance
  and sharpness of the reconstructions (`gm.vae_eval.evaluate` with the CIFAR-10 judge);
- 2.3 / 2.4: the MNIST and CIFAR-10 LDMs of the seed (the VAE of seed 0, as in 2.3), DDIM-50 at eta 0 and eta 1
  (each sampler as 2.3 runs it, guidance included): conditional accuracy.

Per quantity: the value of each seed, and the mean and spread (max - min) over seeds.

    python -m gm.seeds --profile quick    # writes fig/seeds_gm.md and fig/seeds_gm.json (`make seeds`)
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from dataclasses import asdict, dataclass

from common import fig_dir, make_config
from common.cli import profile_main, write_fig_pair
from common.config import check
from common.plotting import markdown_table
from gm.eval import load_or_train_classifier
from gm.ldm import ldm_config, train_ldm
from gm.ldm_eval import evaluate_ldm, report_samplers
from gm.vae import gan_config, train_vae
from gm.vae_eval import evaluate


@dataclass
class SeedsConfig:
    """Which runs to repeat over which training seeds (`seeds_config(profile)` picks a preset)."""

    profile: str = "quick"  # the profile of every run (the notebooks' presets)
    seeds: tuple[int, ...] = (0, 1, 2)
    gan_weight: float | None = None  # None: fig/part2_summary.json's smallest effective gan_weight, else 1
    eval_images: int = 2000  # CIFAR-10 test images of the 2.2 measures
    ldm_datasets: tuple[str, ...] = ("mnist", "cifar10")

    def __post_init__(self):
        self.seeds, self.ldm_datasets = tuple(self.seeds), tuple(self.ldm_datasets)
        check(len(self.seeds) >= 2 and len(set(self.seeds)) == len(self.seeds),
              f"SeedsConfig.seeds must be >= 2 distinct seeds (a spread needs two), got {self.seeds}")
        check(self.gan_weight is None or self.gan_weight > 0, "gan_weight must be > 0 (0 is the control)")


PRESETS = {
    "smoke": dict(profile="smoke", seeds=(0, 1), eval_images=64),
    "quick": dict(profile="quick"),
    "full": dict(profile="full", eval_images=10_000),
}


def seeds_config(profile: str | None = None, **overrides) -> SeedsConfig:
    """The seeds config of `profile` (default $HW3_PROFILE or quick) with `overrides`."""
    return make_config(SeedsConfig, PRESETS, profile, **overrides)


def effective_gan_weight(cfg: SeedsConfig) -> float:
    """`cfg.gan_weight`, else the smallest effective gan_weight notebook 2_2 found, else 1."""
    if cfg.gan_weight is not None:
        return cfg.gan_weight
    path = fig_dir() / "part2_summary.json"
    found = json.loads(path.read_text()).get("gan", {}).get("smallest_effective_gan_weight") if path.is_file() else None
    return found or 1.0


def run_seeds(cfg: SeedsConfig) -> dict:
    """Train (or load) and measure every run of `cfg` per seed; returns {"config", "gan_weight", "rows": one row per
    (seed, quantity), "spread": mean, spread and values per quantity}."""
    weight, rows = effective_gan_weight(cfg), []
    judge = load_or_train_classifier("cifar10", cfg.profile).model
    for seed in cfg.seeds:
        for w in (0.0, weight):
            run = train_vae(gan_config(1e-3, w, cfg.profile, gan_mode="adaptive", seed=seed, progress=False), True)
            m = evaluate(run.model, "cifar10", num_images=cfg.eval_images, judge=judge)
            rows += [{"seed": seed, "quantity": f"2.2 {key}, gan_weight {w:g}", "value": m[key]}
                     for key in ("feature_dist", "sharpness")]
        for dataset in cfg.ldm_datasets:
            classifier = load_or_train_classifier(dataset, cfg.profile).model
            ldm = train_ldm(ldm_config(dataset, cfg.profile, seed=seed, progress=False))
            ddim = report_samplers(ldm.config)["ddim"]
            samplers = {f"eta{eta:g}": dataclasses.replace(ddim, eta=eta) for eta in (0.0, 1.0)}
            for r in evaluate_ldm(ldm, classifier, samplers, progress=False)[2:]:
                rows.append({"seed": seed, "quantity": f"{dataset} LDM cond. accuracy, {r['images_from']} eta "
                                                       f"{r['eta']:g}", "value": r["cond_accuracy"]})
    spread = []
    for quantity in dict.fromkeys(r["quantity"] for r in rows):
        values = [r["value"] for r in rows if r["quantity"] == quantity]
        spread.append({"quantity": quantity, "seeds": len(values), "mean": statistics.fmean(values),
                       "spread": max(values) - min(values),
                       "values": ", ".join(f"{v:.4g}" for v in values)})
    return {"config": asdict(cfg), "gan_weight": weight, "rows": rows, "spread": spread}


def write_tables(out: dict) -> str:
    """`fig/seeds_gm.md` (mean and spread per quantity) and `fig/seeds_gm.json` of a `run_seeds` result."""
    cfg = out["config"]
    text = (f"Part Two over training seeds {', '.join(map(str, cfg['seeds']))} ({cfg['profile']} profile; 2.2 at "
            f"gan_weight 0 and {out['gan_weight']:g}, {cfg['eval_images']} CIFAR-10 test images; LDM samples as "
            f"in 2.3): mean and spread (max - min) over seeds\n\n{markdown_table(out['spread'])}\n")
    return write_fig_pair("seeds_gm", text, out)


def main(argv: list[str] | None = None) -> None:
    """`python -m gm.seeds [--profile quick]`: train, evaluate and write fig/seeds_gm.md / .json."""
    profile_main(argv, __doc__.splitlines()[0], lambda profile: write_tables(run_seeds(seeds_config(profile))))


if __name__ == "__main__":
    sys.exit(main())
