"""Analysis of a DPO policy (tasks 1.3, 1.4): the numerical checks of 1.3.1 and of the DPO gradient, reward accuracy
by kind of pair, and the evaluation of a policy by an external reward on held-out prompts.

The evaluation (`evaluate_policy`) is what the DPO paper's sentiment experiment measures: sample one reply per
held-out prompt from the policy, score it with the oracle (`fm.reward.sentiment_reward`), and estimate the policy's
sequence-level KL(pi || pi_ref) from the same samples, E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)]. Reward against KL
over several beta is the reward-KL frontier (`plot_frontier`, the paper's Figure 2, left). DPO's implicit reward
beta * log(pi / pi_ref) is no such measure: on samples of pi its mean is that KL, >= 0 whatever DPO learned.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common import cache_dir
from common.checks import mean_ci, wilson_interval
from common.config import json_digest
from common.io import atomic_save, merge_json
from common.params import weights_digest
from common.plotting import new_figure, save_figure
from fm.data import IGNORE_INDEX, collate
from fm.dpo import dpo_loss, reward_accuracy
from fm.generate import Completions, sample_completions
from fm.logps import PreferenceData, concatenated_logps, pair_logps, sequence_logps
from fm.metrics import distinct_n, win_rate
from fm.preference import Pair, tokenize_pair
from fm.reward import sentiment_reward
from fm.tokenizer import padding_id


@torch.no_grad()
def conditional_vs_joint(policy: nn.Module, reference: nn.Module, tokenizer, pair: Pair, beta: float = 0.1,
                         block_size: int = 1024) -> dict[str, float]:
    """Both sides of the 1.3.1 identity for one prompt x and its two responses y_w (chosen), y_l (rejected).

    conditional: beta * [log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)], response tokens scored only;
    joint:       the same with log p(x, y) = log p(x) + log p(y|x), every token after a BOS scored (the BOS makes
                 log p(x) a proper sum over all prompt tokens, x_1 included).
    Also returns the log p(x) terms of both models, which are far from zero, so the match is not trivial.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    bos = tokenizer.eos_token_id if bos is None else bos
    rows = {}
    for name, example in zip(("chosen", "rejected"), tokenize_pair(tokenizer, pair, block_size), strict=True):
        seq = [bos, *example["input_ids"]]
        response = [0, *(int(label != IGNORE_INDEX) for label in example["labels"])]
        rows[name] = (seq, response, [0] + [1] * (len(seq) - 1))
    out: dict[str, float] = {}
    for tag, model in (("policy", policy), ("reference", reference)):
        device = next(model.parameters()).device
        for name, (seq, cond_mask, joint_mask) in rows.items():
            ids = torch.tensor([seq, seq], device=device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            cond, joint = sequence_logps(logits, ids, torch.tensor([cond_mask, joint_mask], device=device)).tolist()
            out[f"{tag}_{name}_conditional"], out[f"{tag}_{name}_joint"] = cond, joint
        out[f"{tag}_log_p_prompt"] = out[f"{tag}_chosen_joint"] - out[f"{tag}_chosen_conditional"]
    for form in ("conditional", "joint"):
        out[f"margin_{form}"] = beta * (
            (out[f"policy_chosen_{form}"] - out[f"reference_chosen_{form}"])
            - (out[f"policy_rejected_{form}"] - out[f"reference_rejected_{form}"])
        )
    out["abs_difference"] = abs(out["margin_conditional"] - out["margin_joint"])
    return out


def gradient_weighting_check(
    policy: nn.Module,
    batch: dict[str, torch.Tensor],
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> dict[str, float]:
    """Autograd gradient of the DPO loss vs the closed form, on the policy's parameters.

    Closed form: grad sum_i loss_i = sum_i -beta * sigmoid(r_l,i - r_w,i) * (grad log pi(y_w,i) - grad log pi(y_l,i)),
    with r the implicit rewards. The weights are computed from the rewards alone, then applied to the log-prob
    gradients; a mismatch would mean the loss is not the DPO objective. Returns the relative error of the
    parameter gradient, the max error of d loss / d log pi, and the per-pair weights.
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    chosen, rejected = concatenated_logps(policy, batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, reference_chosen_logps, reference_rejected_logps, beta=beta
    )
    grad_logps = torch.autograd.grad(losses.sum(), (chosen, rejected), retain_graph=True)
    grad_auto = torch.autograd.grad(losses.sum(), params, retain_graph=True)
    weights = beta * torch.sigmoid(rejected_rewards - chosen_rewards)  # large when the pair is ranked wrongly
    grad_formula = torch.autograd.grad((-weights * (chosen - rejected)).sum(), params)
    auto, formula = torch.cat([g.flatten() for g in grad_auto]), torch.cat([g.flatten() for g in grad_formula])
    return {
        "param_grad_rel_error": float((auto - formula).norm() / formula.norm().clamp_min(1e-30)),
        "logp_grad_max_error": float(
            torch.maximum((grad_logps[0] + weights).abs().max(), (grad_logps[1] - weights).abs().max())
        ),
        "param_grad_norm": float(auto.norm()),
        "weights": weights.tolist(),
    }


def rewards_by_kind(policy: nn.Module, data: PreferenceData, beta: float, batch_size: int = 8) -> list[dict]:
    """Per kind of pair (and "all"): count, how often the reference alone already ranks chosen above rejected
    by likelihood, and the policy's implicit-reward accuracy and mean margin."""
    chosen, rejected = pair_logps(policy.eval(), data.examples, data.pad_token_id, batch_size)
    _, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, data.reference_chosen, data.reference_rejected,
                                                   beta=beta)
    accuracy = reward_accuracy(chosen_rewards, rejected_rewards)
    margin = chosen_rewards - rejected_rewards
    likelihood = reference_preference(data)
    rows = []
    for kind in [*sorted(set(data.kinds)), "all"]:
        idx = torch.tensor([i for i, k in enumerate(data.kinds) if kind in (k, "all")])
        rows.append({"kind": kind, "pairs": len(idx), "reference_prefers_chosen": likelihood[idx].mean().item(),
                     "reward_acc": accuracy[idx].mean().item(), "mean_margin": margin[idx].mean().item()})
    return rows


def reference_preference(data: PreferenceData) -> torch.Tensor:
    """Per pair (N,): 1 where the reference alone gives the chosen reply the higher likelihood, 0.5 on a tie, else 0.
    It reads the cached reference log-probs: no forward pass."""
    return reward_accuracy(data.reference_chosen, data.reference_rejected)


# ---------------------------------------------------------------------------------------------- policy evaluation
@torch.no_grad()
def completion_logps(model: nn.Module, completions: Completions, pad_token_id: int, batch_size: int = 16
                     ) -> torch.Tensor:
    """log p(completion | prompt) of the exact sampled ids, summed over the completion (its stop token included),
    (N,) float32 on the CPU. Sequences are scored in batches of similar length (less padding), results in order."""
    if len(completions) == 0:
        raise ValueError("completion_logps got no completions")
    device = next(model.parameters()).device
    rows = [(p, c) for p, c in zip(completions.prompt_ids, completions.completion_ids, strict=True)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    out = torch.empty(len(rows))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        examples = [{"input_ids": rows[i][0] + rows[i][1], "labels": [IGNORE_INDEX] * len(rows[i][0]) + rows[i][1]}
                    for i in idx]
        batch = {k: v.to(device) for k, v in collate(examples, pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out[idx] = sequence_logps(logits, batch["input_ids"], batch["labels"] != IGNORE_INDEX).float().cpu()
    return out


@dataclass
class PolicyEval:
    """One policy's samples on the evaluation prompts, their oracle rewards and log-probs (each (N,))."""

    name: str
    completions: Completions
    rewards: torch.Tensor  # oracle reward of each reply
    logps: torch.Tensor  # log pi(y|x) of each sample under the policy
    ref_logps: torch.Tensor  # ... and under the reference

    @property
    def log_ratios(self) -> torch.Tensor:
        """log pi(y|x) - log pi_ref(y|x) per sample: their mean estimates KL(pi || pi_ref), since y ~ pi."""
        return self.logps - self.ref_logps

    def summary(self) -> dict[str, float | str | int]:
        """Mean oracle reward with its 95 % CI, the KL estimate with its standard error, and the fluency guards:
        mean reply length in words, word distinct-2, and the reference model's log-prob per completion token."""
        reward, low, high = mean_ci(self.rewards)
        kl = self.log_ratios
        tokens = sum(len(c) for c in self.completions.completion_ids)
        words = [r.split() for r in self.completions.replies]
        return {"policy": self.name, "prompts": len(self.rewards), "reward": reward, "reward_ci_low": low,
                "reward_ci_high": high, "kl": kl.mean().item(), "kl_se": (kl.std() / len(kl) ** 0.5).item(),
                "mean_words": statistics.fmean(len(w) for w in words), "distinct_2": distinct_n(words, 2),
                "ref_logp_per_token": self.ref_logps.sum().item() / tokens}


def evaluate_policy(name: str, policy: nn.Module, reference: nn.Module, tokenizer, prompts: Sequence[str],
                    max_new_tokens: int, seed: int = 0, batch_size: int = 32, score_batch_size: int = 32,
                    cache: bool = False) -> PolicyEval:
    """One fresh sample per prompt from `policy` (temperature 1, seed `seed`: give every policy the same; prompts
    sampled `batch_size` at a time), scored by the oracle, and the log-probs of the sampled ids under the policy and
    the reference (KL estimate; `score_batch_size` sequences per forward pass). A policy that is the reference gets
    log-ratios of exactly 0 without a second pass.

    With `cache`, the result is kept in cache_dir()/policy_evals/ under a hash of both models' weights, the prompts
    and the settings (1.4 re-reads 1.3's evaluations of the same SFT and DPO models instead of sampling again).
    """
    if tokenizer is None:
        raise ValueError(f"evaluate_policy({name!r}) needs the policy's tokenizer")
    if isinstance(prompts, str) or len(prompts) < 2:
        raise ValueError("evaluate_policy needs a list of at least 2 prompts (a confidence interval needs 2)")
    path = None
    if cache:
        key = [weights_digest(policy), weights_digest(reference), list(prompts), max_new_tokens, seed, batch_size]
        path = cache_dir() / "policy_evals" / f"{json_digest(key, 16)}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=True)
            return PolicyEval(name, Completions(**saved.pop("completions")), **saved)
    policy.eval()
    completions = sample_completions(policy, tokenizer, prompts, max_new_tokens, batch_size, seed, temperature=1.0)
    pad = padding_id(tokenizer)
    ref_logps = completion_logps(reference.eval(), completions, pad, score_batch_size)
    logps = ref_logps.clone() if policy is reference else completion_logps(policy, completions, pad, score_batch_size)
    result = PolicyEval(name, completions, sentiment_reward(completions.replies), logps, ref_logps)
    if path is not None:
        atomic_save({"completions": vars(completions), "rewards": result.rewards, "logps": logps,
                     "ref_logps": ref_logps}, path)
    return result


def compare_to_baseline(evals: Sequence[PolicyEval], baseline: PolicyEval) -> list[dict]:
    """`PolicyEval.summary` of each policy plus its oracle win rate against `baseline` on the same prompts (ties
    count half) with the 95 % CI: `win_rate`, `win_ci_low`, `win_ci_high`."""
    rows = []
    for ev in evals:
        if ev.completions.prompts != baseline.completions.prompts:
            raise ValueError(f"{ev.name} and {baseline.name} were evaluated on different prompts")
        rate, low, high = win_rate(ev.rewards, baseline.rewards)
        rows.append({**ev.summary(), "win_rate": rate, "win_ci_low": low, "win_ci_high": high})
    return rows


def length_controlled_win_rate(policy: PolicyEval, baseline: PolicyEval) -> tuple[float, float, float]:
    """Win rate of `policy` over `baseline` (rate, 95 % CI low, high; ties count half) with both replies to each
    prompt cut to the word count of the shorter one and scored again by the oracle: a policy that wins only by
    writing longer replies (more room for positive words) drops to about 0.5 here."""
    if policy.completions.prompts != baseline.completions.prompts:
        raise ValueError(f"{policy.name} and {baseline.name} were evaluated on different prompts")
    cut_a, cut_b = [], []
    for a, b in zip(policy.completions.replies, baseline.completions.replies, strict=True):
        words_a, words_b = a.split(), b.split()
        n = min(len(words_a), len(words_b))
        cut_a.append(" ".join(words_a[:n]))
        cut_b.append(" ".join(words_b[:n]))
    return win_rate(sentiment_reward(cut_a), sentiment_reward(cut_b))


def plot_frontier(points: Sequence[dict], baseline: dict, path: str | Path, title: str) -> Path:
    """Mean oracle reward against KL(pi || pi_ref) with 95 % CIs on both (error bars): one colour per (method, beta),
    one marker per training seed, a line per method through its per-beta means, and the SFT reference at KL 0.
    `points`: `frontier_point` dicts; `baseline`: {"reward": ..., "reward_ci": [lo, hi]}."""
    fig, ax = new_figure(figsize=(7, 4.5))
    low, high = baseline["reward_ci"]
    ax.errorbar([0.0], [baseline["reward"]], yerr=[[baseline["reward"] - low], [high - baseline["reward"]]],
                color="black", marker="s", capsize=3, zorder=3, label="SFT (reference)")
    markers = "osD^v<>"
    seeds = sorted({p["seed"] for p in points})
    keys = list(dict.fromkeys((p["method"], p["beta"]) for p in points))
    colors = {key: f"C{i % 10}" for i, key in enumerate(keys)}
    for method in dict.fromkeys(m for m, _ in keys):
        means = []
        for key in (k for k in keys if k[0] == method):
            mine = [p for p in points if (p["method"], p["beta"]) == key]
            for p in mine:
                ax.errorbar(p["kl"], p["reward"], xerr=[[p["kl"] - p["kl_ci"][0]], [p["kl_ci"][1] - p["kl"]]],
                            yerr=[[p["reward"] - p["reward_ci"][0]], [p["reward_ci"][1] - p["reward"]]],
                            color=colors[key], marker=markers[seeds.index(p["seed"]) % len(markers)], capsize=2,
                            alpha=0.8, linestyle="none",
                            label=f"{method.upper()}, beta={key[1]:g}" if p is mine[0] else None)
            means.append((statistics.fmean(p["kl"] for p in mine), statistics.fmean(p["reward"] for p in mine)))
        means.sort()
        ax.plot([m[0] for m in means], [m[1] for m in means], color="grey", linewidth=0.8, zorder=1)
    ax.set_title(title, fontsize=9)
    ax.set(xlabel="KL(pi || pi_SFT) per reply (nats), on the policy's own samples",
           ylabel="mean oracle reward (VADER compound)")
    ax.grid(alpha=0.3)
    seed_note = ", ".join(f"{markers[i % len(markers)]} = seed {s}" for i, s in enumerate(seeds))
    ax.legend(fontsize=7, loc="lower right", title=f"markers: {seed_note}", title_fontsize=7)
    return save_figure(fig, path)


SUMMARY_SOURCES = {"sentiment": "oracle-sentiment", "hh": "hh-rlhf", "chitchat": "chitchat-fixture"}
SUMMARY_KEYS = ("source", "n_train_pairs", "n_eval_prompts", "win_rate", "win_rate_ci", "length_controlled_win_rate",
                "length_controlled_win_rate_ci", "reward", "frontier", "val_reward_accuracy", "val_reward_accuracy_ci",
                "n_val_pairs")


def frontier_point(method: str, beta: float, ev: PolicyEval, seed: int = 0, steps: int = 0) -> dict:
    """One point of the reward-KL frontier: {method, beta, seed (the training seed), steps (its training steps),
    n_prompts, kl, kl_ci, reward, reward_ci} of an evaluated policy, with the 95 % CIs of both means over its
    prompts."""
    kl, kl_low, kl_high = mean_ci(ev.log_ratios)
    reward, low, high = mean_ci(ev.rewards)
    return {"method": method, "beta": beta, "seed": seed, "steps": steps, "n_prompts": len(ev.rewards), "kl": kl,
            "kl_ci": [kl_low, kl_high], "reward": reward, "reward_ci": [low, high]}


def dpo_summary(source: str, n_train_pairs: int, sft: PolicyEval, dpo: PolicyEval, frontier: Sequence[dict],
                val_reward_accuracy: float, n_val_pairs: int) -> dict:
    """The headline numbers of 1.3/1.4 (`fig/dpo_summary.json`, keys SUMMARY_KEYS): the pair source
    ("oracle-sentiment" | "hh-rlhf"), the training pairs, the evaluation prompts, DPO's oracle win rate against SFT
    with its 95 % CI, the same with both replies cut to equal length (`length_controlled_win_rate`), both mean
    rewards, the frontier points, and DPO's final validation reward accuracy on `n_val_pairs` pairs with its Wilson
    95 % CI."""
    rate, low, high = win_rate(dpo.rewards, sft.rewards)
    lc_rate, lc_low, lc_high = length_controlled_win_rate(dpo, sft)
    rewards = {"sft": sft.rewards.mean().item(), "dpo": dpo.rewards.mean().item()}
    return {"source": SUMMARY_SOURCES[source], "n_train_pairs": n_train_pairs, "n_eval_prompts": len(sft.rewards),
            "win_rate": rate, "win_rate_ci": [low, high], "length_controlled_win_rate": lc_rate,
            "length_controlled_win_rate_ci": [lc_low, lc_high], "reward": rewards, "frontier": list(frontier),
            "val_reward_accuracy": val_reward_accuracy,
            "val_reward_accuracy_ci": list(wilson_interval(round(val_reward_accuracy * n_val_pairs), n_val_pairs)),
            "n_val_pairs": n_val_pairs}


def write_dpo_summary(path: str | Path, summary: dict) -> dict:
    """Write `summary` (`dpo_summary`) to `path`, keeping the frontier points of an earlier summary of the same source
    whose (method, beta, seed, steps) `summary` does not have: 1.3 writes its DPO point, 1.4 adds the other losses,
    betas and seeds, and rerunning either keeps the other's points. Returns what was written."""
    path = Path(path)
    old = json.loads(path.read_text()) if path.is_file() else {}

    def key(point: dict) -> tuple:
        return point["method"], point["beta"], point.get("seed", 0), point.get("steps", 0)

    new_keys = {key(p) for p in summary["frontier"]}
    kept = [p for p in old.get("frontier", []) if old.get("source") == summary["source"] and key(p) not in new_keys]
    out = {**summary, "frontier": sorted([*summary["frontier"], *kept], key=key)}
    merge_json(path, out)
    return out
