"""Metrics of generations: distinct-n, and the statistics of a comparison (mean with a confidence interval, win
rate with ties counted half); `DISPLAY_NAMES`, the headers Part One's tables show for its machine keys."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.checks import Z_95, mean_ci

# Part One's rows and fig/*.json hold snake_case or namespaced keys (TRL's `rewards/accuracies`, the trainer's
# `val_loss` and `step_time`); a rendered table shows these names (`markdown_table(rows, names=DISPLAY_NAMES)`).
DISPLAY_NAMES = {
    # KV-cache timings (fm.generate.kv_cache_benchmark, bench/bench_kv_cache.py) and the loaded LM (1.0)
    "new_tokens": "new tokens", "cached_s": "cached (s)", "uncached_s": "uncached (s)",
    "cached_tokens_per_s": "cached tokens/s", "uncached_tokens_per_s": "uncached tokens/s", "speedup": "speed-up",
    "speedup_min": "speed-up min", "speedup_max": "speed-up max", "work_ratio": "work ratio",
    "same_tokens": "same tokens", "kv_cache": "KV cache",
    "parameters_m": "parameters (M)", "load_s": "load time (s)", "rss_increase_mb": "RSS increase (MB)",
    # SFT and DPO metrics (1.2, 1.3)
    "finetuning": "fine-tuning", "tokens_per_step": "tokens per step", "val_loss_before": "val loss before",
    "val_loss_after": "val loss after", "train_tokens_per_s": "train tokens/s", "s_per_step": "s per step",
    "perplexity_tokens": "perplexity tokens", "perplexity_examples": "perplexity examples",
    "notebook_s": "notebook time so far (s)", "sft_model": "SFT model", "pair_source": "pair source",
    "train_pairs": "train pairs", "val_pairs": "val pairs", "steps_x_pairs": "steps x pairs per step",
    "epochs": "epochs over the pairs", "val_rewards/accuracies_start": "val reward accuracy at start",
    "val_rewards/accuracies_end": "val reward accuracy at end",
    "val_rewards/accuracies_end_ci": "val reward accuracy at end, 95 % CI",
    "val_reference_prefers_chosen": "val pairs where the SFT model prefers the chosen reply",
    "val_loss_start": "val loss at start", "val_loss_end": "val loss at end",
    "val_rewards/chosen_end": "val chosen reward at end", "val_rewards/rejected_end": "val rejected reward at end",
    "val_rewards/margins_end": "val margin at end", "eval/win_rate": "held-out win rate DPO vs SFT",
    "eval/win_rate_ci": "win rate 95 % CI",
    "eval/length_controlled_win_rate": "length-controlled win rate DPO vs SFT",
    "eval/length_controlled_win_rate_ci": "length-controlled win rate 95 % CI",
    "perplexity_dpo": "perplexity of the DPO model on the SFT validation dialogues",
    "eval/reward/sft": "held-out reward SFT", "eval/reward/dpo": "held-out reward DPO",
    "eval/kl": "held-out KL(DPO, SFT) per reply (nats)", "eval/kl_ci": "held-out KL 95 % CI",
    **{f"eval/{k}/{policy.lower()}": f"held-out {name}, {policy}" for policy in ("SFT", "DPO")
       for k, name in (("mean_words", "mean words"), ("ref_logp_per_token", "ref log-prob / token"))},
    "pairs_s": "pair sampling (or cache) time (s)", "dpo_s": "DPO time incl. reference log-probs and evals (s)",
    "eval_s": "held-out evaluation time (s)", "sft_s": "SFT load (or training) time (s)",
    "margin_abs_difference": "1.3.1 check: abs(conditional margin - joint margin)",
    "param_grad_rel_error": "gradient formula relative error",
    # policy evaluations and comparisons (fm.dpo_analysis, fm.comparisons, fm.seeds; 1.3, 1.4)
    "reward_ci_low": "reward CI low", "reward_ci_high": "reward CI high", "kl": "KL", "kl_se": "KL s.e.",
    "mean_words": "mean words", "distinct_1": "distinct-1", "distinct_2": "distinct-2",
    "distinct_2_within_reply": "distinct-2 within a reply", "ref_logp_per_token": "ref log-prob / token",
    "win_rate": "win rate vs SFT", "win_ci_low": "win CI low", "win_ci_high": "win CI high",
    "val_rewards/accuracies": "val reward acc", "step_time": "s / step", "trainable_params": "trainable params",
    "trainable_pct": "trainable %", "peak_extra_memory_mb": "peak extra memory (MB)", "tokens_per_s": "tokens / s",
    "oracle_reward": "oracle reward", "reward_ci_halfwidth": "reward CI +-",
    **{f"{k}_{stat}": f"{name} {stat}" for stat in ("mean", "spread") for k, name in (
        ("reward", "reward"), ("kl", "KL"), ("win_rate", "win rate vs SFT"),
        ("val_rewards/accuracies", "val reward acc"))},
}


def distinct_n(sequences: Sequence[Sequence | str], n: int) -> float:
    """Distinct-n (Li et al., 2016): number of unique n-grams / number of n-grams, pooled over all sequences.

    `sequences` holds token lists (ids or strings); a plain string is split on whitespace. 1.0 means no n-gram
    repeats anywhere in the set; a degenerate, looping generator scores near 0. Sequences shorter than `n`
    contribute nothing; with no n-gram at all the result is 0.0.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if isinstance(sequences, str):
        raise TypeError("distinct_n expects a list of sequences, got a single string; wrap it in a list")
    unique, total = set(), 0
    for seq in sequences:
        tokens = seq.split() if isinstance(seq, str) else list(seq)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        unique.update(grams)
        total += len(grams)
    return len(unique) / total if total else 0.0


def win_scores(rewards_a: Sequence[float] | torch.Tensor, rewards_b: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Per prompt: 1 where a's reward beats b's, 0.5 on a tie, 0 where it loses; (N,) float64."""
    a = torch.as_tensor(rewards_a, dtype=torch.float64).flatten()
    b = torch.as_tensor(rewards_b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"win rate compares rewards on the same prompts: got {a.numel()} and {b.numel()} rewards")
    return (a > b).double() + 0.5 * (a == b).double()


def win_rate(rewards_a: Sequence[float] | torch.Tensor, rewards_b: Sequence[float] | torch.Tensor,
             z: float = Z_95) -> tuple[float, float, float]:
    """Win rate of a over b on paired rewards (ties count half) and its confidence interval, as (rate, low, high).

    The rate is the mean of `win_scores`, so its interval is `mean_ci` of those per-prompt scores.
    """
    return mean_ci(win_scores(rewards_a, rewards_b), z)
