"""Task 1.4: the comparison studies of the LM pipeline, each enhancement against its baseline on the same data and
budget (`notebooks/1_4_lm_enhancement.ipynb`).

- `compare_finetuning`: what LoRA saves against full fine-tuning (trainable parameters, peak memory, speed) over a
  few steps; no quality comparison (that needs each method's tuned learning rate over a real run);
- `compare_preference_losses`: DPO at several beta and IPO, each over several training seeds, trained like 1.3's DPO
  and evaluated like it, on held-out prompts by the oracle reward: reward and KL from the SFT model with their CIs
  (the reward-KL frontier), win rate against SFT, fluency;
- `compare_decoding`: greedy vs temperature/top-k vs nucleus sampling (oracle reward, distinct-n, length,
  reference log-prob per token).

Everything else comes from its own module: models and training from `fm.sft` / `fm.dpo_train`, the policy
evaluation from `fm.dpo_analysis`, sampling from `fm.generate`, distinct-n and confidence intervals from
`fm.metrics`, memory probing from `common.memory`, bar plots from `common.plotting`.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from common import make_config
from common.checks import mean_ci
from common.config import check
from common.logging import column
from common.memory import peak_memory
from common.params import count_parameters
from fm.dpo import PREFERENCE_LOSSES, DPOConfig, dpo_config
from fm.dpo_analysis import PolicyEval, completion_logps, evaluate_policy
from fm.dpo_train import train_dpo
from fm.generate import sample_completions
from fm.metrics import distinct_n, win_rate
from fm.preference import chitchat_prompts
from fm.reward import sentiment_reward
from fm.sft import HOMEWORK_PROMPT, build_sft, sft_config
from fm.tokenizer import padding_id

LOSS_NAMES = {"dpo": "DPO", "cdpo": "cDPO", "ipo": "IPO"}


@dataclass
class LMEnhanceConfig:
    """Settings of the three comparisons of task 1.4 (`lm_enhance_config(profile)` picks a preset)."""

    profile: str = "quick"  # the SFT / DPO profile whose models, data and presets the experiments reuse
    # 1. LoRA vs full fine-tuning, costs only: the SFT setup of `profile` for `ft_steps` steps from the pretrained model
    ft_steps: int = 3
    ft_eval_examples: int = 8
    full_lr: float = 5e-5  # a usual full fine-tuning lr for a ~100M model (the cost does not depend on it)
    lora_lr: float = 5e-4  # adapters start at zero and take larger steps (the 1.2 quick preset's LoRA settings)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    # 2. preference losses: `train_dpo` of `profile` (its pairs, steps, lr, batches) with (loss, beta) swapped, once
    # per training seed, evaluated on the DPO config's held-out test prompts as 1.3's DPO is; the (loss, beta, seed)
    # of 1.3's run is 1.3's run, loaded from its folder
    variants: tuple[tuple[str, float], ...] = (("dpo", 0.05), ("dpo", 0.1), ("dpo", 0.5), ("dpo", 2.0))
    seeds: tuple[int, ...] = (0, 1)  # training seeds (LoRA init, batch order); the pairs and prompts stay the same
    # a cheaper run per frontier point where the budget needs it (0: the DPO profile's own steps, validation pairs
    # and evaluation prompts, so that 1.3's (loss, beta, seed) is 1.3's run)
    frontier_steps: int = 0
    frontier_val_pairs: int = 0
    frontier_prompts: int = 0
    label_smoothing: float = 0.1  # cDPO's assumed fraction of flipped labels
    # 3. decoding: sampling strategies on DPO and SFT (the KV cache is timed in 1.0)
    decode_prompts: int = 6  # held-out prompts (the homework prompt first)
    max_new_tokens: int = 32
    decode_batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("ft_steps", "ft_eval_examples", "lora_rank", "decode_prompts", "max_new_tokens",
                     "decode_batch_size"):
            check(getattr(self, name) > 0, f"LMEnhanceConfig.{name} must be positive, got {getattr(self, name)}")
        check(min(self.full_lr, self.lora_lr, self.lora_alpha) > 0, "lrs and lora_alpha must be > 0")
        check(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), f"seeds must be distinct: {self.seeds}")
        for name in ("frontier_steps", "frontier_val_pairs", "frontier_prompts"):
            check(getattr(self, name) >= 0, f"LMEnhanceConfig.{name} must be >= 0 (0: the DPO profile's)")
        check(self.frontier_prompts != 1, "frontier_prompts must be >= 2 (a confidence interval needs 2)")
        unknown = {loss for loss, _ in self.variants} - set(PREFERENCE_LOSSES)
        check(not unknown, f"unknown preference variants {sorted(unknown)}; choose from {sorted(PREFERENCE_LOSSES)}")
        check(len(self.variants) > 0 and all(beta > 0 for _, beta in self.variants),
              f"variants must be a non-empty list of (loss, beta > 0): {self.variants}")
        check(0 < self.label_smoothing < 0.5, f"label_smoothing must be in (0, 0.5), got {self.label_smoothing}")
        check(self.decode_prompts >= 2, "decode_prompts must be >= 2 (a confidence interval needs 2)")


PRESETS = {
    "smoke": dict(profile="smoke", ft_steps=2, ft_eval_examples=4, full_lr=1e-3, lora_lr=1e-2, lora_rank=4,
                  lora_alpha=8.0, variants=(("dpo", 0.1), ("cdpo", 0.1), ("ipo", 0.1)), seeds=(0, 1),
                  decode_prompts=2, max_new_tokens=6, decode_batch_size=2),
    # 8 DPO runs (4 beta x 2 seeds) of 1.3's length do not fit the quick budget: 8 steps each (64 pair updates,
    # 0.25 epochs), 16 validation pairs and 40 held-out prompts per point (each run ~90 s on 2 cores)
    "quick": dict(profile="quick", frontier_steps=8, frontier_val_pairs=16, frontier_prompts=40),
    "full": dict(profile="full", ft_steps=200, ft_eval_examples=256,
                 variants=(("dpo", 0.05), ("dpo", 0.1), ("dpo", 0.5), ("dpo", 2.0), ("dpo", 5.0), ("cdpo", 0.1),
                           ("ipo", 0.1), ("ipo", 0.5)), seeds=(0, 1, 2),
                 decode_prompts=256, max_new_tokens=128, decode_batch_size=32),
}


def lm_enhance_config(profile: str | None = None, **overrides) -> LMEnhanceConfig:
    """The experiment config of `profile` (default $HW3_PROFILE or quick) with `overrides`."""
    return make_config(LMEnhanceConfig, PRESETS, profile, **overrides)


def _mean_after_first(values: Sequence[float]) -> float:
    """Mean of a per-step metric without the first step, which pays one-off costs (allocation, warm-up)."""
    return statistics.fmean(values[1:] if len(values) > 1 else values)


# ---------------------------------------------------------------------------------------------- 1. LoRA vs full
@dataclass
class Comparison:
    """A table (one row per method) and what stands behind it."""

    rows: list[dict]
    samples: dict[str, str] = field(default_factory=dict)  # example generations, for the decoding comparison
    evals: dict[str, PolicyEval] = field(default_factory=dict)  # held-out evaluations, by row name


def compare_finetuning(cfg: LMEnhanceConfig) -> Comparison:
    """What LoRA saves against full fine-tuning: the SFT run of `cfg.profile` for `cfg.ft_steps` steps, same data and
    batches, fresh model each.

    Measured per method: trainable parameters, peak extra memory of the training loop (`peak_memory`), mean step time
    and tokens/s. The losses of so few steps at untuned learning rates say nothing about quality, so none is reported.
    Runs: checkpoint_dir()/sft/enhance_<method>_<profile>_<digest>/.
    """
    rows = []
    for method, rank, lr in (("full", 0, cfg.full_lr), (f"LoRA r={cfg.lora_rank}", cfg.lora_rank, cfg.lora_lr)):
        sft_cfg = sft_config(cfg.profile, run_name=f"enhance_{'lora' if rank else 'full'}_{cfg.profile}",
                             steps=cfg.ft_steps, warmup_steps=min(2, cfg.ft_steps - 1), lr=lr, lora_rank=rank,
                             lora_alpha=cfg.lora_alpha, eval_examples=cfg.ft_eval_examples, eval_interval=0,
                             seed=cfg.seed)
        setup = build_sft(sft_cfg)
        trainable, total = count_parameters(setup.model, trainable_only=True), count_parameters(setup.model)
        with peak_memory(setup.trainer.device) as mem:
            setup.trainer.fit(setup.step_fn, setup.eval_fn)
        train = setup.trainer.train_log
        rows.append({
            "method": method, "steps": cfg.ft_steps, "trainable_params": trainable,
            "trainable_pct": 100 * trainable / total, "peak_extra_memory_mb": mem["peak_mb"],
            "step_time": _mean_after_first(train.column("step_time")[1]),
            "tokens_per_s": _mean_after_first(train.column("tokens_per_s")[1]),
        })
        print(f"{method}: memory measured as {mem['method']}")
        del setup
    return Comparison(rows)


# ---------------------------------------------------------------------------------------------- 2. preference losses
def preference_run_config(cfg: LMEnhanceConfig, loss: str, beta: float, seed: int) -> DPOConfig:
    """The DPO config of one frontier / preference-loss run: 1.3's (`dpo_config(cfg.profile)`) with `loss`, `beta`
    and training `seed`, shortened to `cfg.frontier_steps` steps and `cfg.frontier_val_pairs` validation pairs where
    they are set (then in run folders named frontier_<profile>_...)."""
    base = dpo_config(cfg.profile)
    shorter = {}
    if cfg.frontier_steps:
        shorter |= dict(steps=cfg.frontier_steps, warmup_steps=min(base.warmup_steps, cfg.frontier_steps - 1),
                        eval_interval=0, run_name=f"frontier_{cfg.profile}")
    if cfg.frontier_val_pairs:
        shorter["val_pairs"] = cfg.frontier_val_pairs
    return dpo_config(cfg.profile, loss=loss, beta=beta, seed=seed,
                      label_smoothing=cfg.label_smoothing if loss == "cdpo" else 0.0, **shorter)


def compare_preference_losses(cfg: LMEnhanceConfig, sft: PolicyEval, prompts: Sequence[str],
                              reference: nn.Module | None = None, tokenizer=None) -> Comparison:
    """`train_dpo` of `cfg.profile` once per (loss, beta) of `cfg.variants` and training seed of `cfg.seeds` (same SFT
    start, pairs, batches and lr as 1.3's run; its steps and validation pairs unless `cfg.frontier_steps` /
    `cfg.frontier_val_pairs` ask for fewer; with 1.3's settings, 1.3's own (loss, beta, seed) is 1.3's run, loaded
    from its folder), each policy evaluated by `fm.dpo_analysis.evaluate_policy` on `prompts` with the seed of `sft`
    (the SFT model's evaluation on them): oracle reward and KL from the SFT model with their CIs, fluency, and the win
    rate against SFT. The losses use the summed log-ratios of the papers (`DPOConfig.length_normalize` off).
    `reference`/`tokenizer`: the SFT model of the profile if already loaded (else `train_dpo` loads it).

    Rows also hold the seed, the final validation reward accuracy and the mean step time; `evals` keeps each
    evaluation (the frontier points), by row name.
    """
    rows, evals = [], {}
    base = dpo_config(cfg.profile)
    for loss, beta in cfg.variants:
        for seed in cfg.seeds:
            dcfg = preference_run_config(cfg, loss, beta, seed)
            result = train_dpo(dcfg, resume=True, model=reference, tokenizer=tokenizer)
            name = (f"{LOSS_NAMES[loss]}{f' (eps={cfg.label_smoothing})' if loss == 'cdpo' else ''}, beta={beta:g}, "
                    f"seed {seed}")
            ev = evaluate_policy(name, result.model, result.reference, result.tokenizer, prompts, base.reply_tokens,
                                 seed=base.seed, batch_size=base.sample_batch_size, cache=True)
            rate, low, high = win_rate(ev.rewards, sft.rewards)
            rows.append({"loss": LOSS_NAMES[loss], "beta": beta, "seed": seed, "steps": dcfg.steps, **ev.summary(),
                         "win_rate": rate, "win_ci_low": low, "win_ci_high": high,
                         "val_rewards/accuracies": result.eval_rows[-1]["val_rewards/accuracies"],
                         "train_pairs": len(result.train_data),
                         "step_time": _mean_after_first(column(result.train_rows, "step_time")[1])})
            evals[name] = ev
            del result
            gc.collect()
    return Comparison(rows, evals=evals)


def seed_spread(rows: Sequence[dict], keys: Sequence[str] = ("reward", "kl", "win_rate", "val_rewards/accuracies")
                ) -> list[dict]:
    """One row per (loss, beta) of `compare_preference_losses`' rows: the number of training seeds and, per metric of
    `keys`, the mean over seeds and the spread (max - min)."""
    out = []
    for loss, beta in dict.fromkeys((r["loss"], r["beta"]) for r in rows):
        mine = [r for r in rows if (r["loss"], r["beta"]) == (loss, beta)]
        row = {"loss": loss, "beta": beta, "seeds": len(mine)}
        for key in keys:
            values = [r[key] for r in mine]
            row[f"{key}_mean"] = statistics.fmean(values)
            row[f"{key}_spread"] = max(values) - min(values)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- 3. decoding
STRATEGIES = {  # name -> keyword arguments of fm.generate.generate
    "greedy": dict(temperature=0.0),
    "T=0.9, top-k 200": dict(temperature=0.9, top_k=200),  # the homework's sampling settings
    "T=1.0, top-p 0.9": dict(temperature=1.0, top_p=0.9),
    "T=0.7, top-p 0.9": dict(temperature=0.7, top_p=0.9),
}


def decoding_prompts(n: int, seed: int = 0) -> list[str]:
    """The homework prompt and n - 1 held-out test prompts (`fm.preference.chitchat_prompts("test")`)."""
    return [HOMEWORK_PROMPT, *chitchat_prompts("test", seed)[: n - 1]]


def compare_decoding(models: dict[str, nn.Module], reference: nn.Module, tokenizer, prompts: Sequence[str],
                     max_new_tokens: int, batch_size: int = 16, seed: int = 0,
                     strategies: dict[str, dict] = STRATEGIES) -> Comparison:
    """Each model's one-line replies to `prompts` under each decoding strategy (`fm.generate.sample_completions`),
    scored by the oracle reward (mean and 95 % CI half-width over prompts), word distinct-1/2 pooled over the replies
    (low when replies repeat each other or themselves), distinct-2 within a reply averaged over the replies (low only
    when a reply loops), mean length and the `reference` (SFT) model's log-prob per reply token. `samples` holds the
    replies to the first prompt."""
    rows, samples = [], {}
    pad = padding_id(tokenizer)
    for model_name, model in models.items():
        for name, decoding in strategies.items():
            out = sample_completions(model, tokenizer, prompts, max_new_tokens, batch_size, seed, **decoding)
            reward, low, _ = mean_ci(sentiment_reward(out.replies))
            ref_logps = completion_logps(reference, out, pad, batch_size)
            words = [r.split() for r in out.replies]
            rows.append({
                "model": model_name, "decoding": name, "oracle_reward": reward, "reward_ci_halfwidth": reward - low,
                "distinct_1": distinct_n(words, 1), "distinct_2": distinct_n(words, 2),
                "distinct_2_within_reply": statistics.fmean([distinct_n([w], 2) for w in words if len(w) > 1]
                                                            or [0.0]),
                "mean_words": statistics.fmean(len(w) for w in words),
                "ref_logp_per_token": ref_logps.sum().item() / sum(len(c) for c in out.completion_ids),
            })
            samples[f"{model_name}, {name}"] = out.replies[0]
    return Comparison(rows, samples=samples)
