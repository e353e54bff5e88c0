"""Analysis of a DPO policy (task 1.3): the numerical checks of 1.3.1 and of the DPO gradient, reward accuracy by
kind of pair, and DPO's implicit reward of any (prompt, response), which the enhancement task uses as a scorer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fm.data import IGNORE_INDEX, collate
from fm.dpo import PreferenceData, concatenated_logps, dpo_loss, pair_logps, reward_accuracy, sequence_logps
from fm.preference import Pair, tokenize_pair, tokenize_response
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
    likelihood = reward_accuracy(data.reference_chosen, data.reference_rejected)
    rows = []
    for kind in [*sorted(set(data.kinds)), "all"]:
        idx = torch.tensor([i for i, k in enumerate(data.kinds) if kind in (k, "all")])
        rows.append({"kind": kind, "pairs": len(idx), "reference_prefers_chosen": likelihood[idx].mean().item(),
                     "reward_acc": accuracy[idx].mean().item(), "mean_margin": margin[idx].mean().item()})
    return rows


@torch.no_grad()
def response_logps(model: nn.Module, tokenizer, prompts: Sequence[str], responses: Sequence[str],
                   block_size: int = 256, batch_size: int = 8) -> torch.Tensor:
    """log pi(response | prompt) summed over the response tokens and its EOS, (N,) on the CPU."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    examples = [tokenize_response(tokenizer, p, r, block_size) for p, r in zip(prompts, responses, strict=True)]
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], padding_id(tokenizer)).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out.append(sequence_logps(logits, batch["input_ids"], batch["labels"] != IGNORE_INDEX).float().cpu())
    return torch.cat(out)


def implicit_reward(policy: nn.Module, reference: nn.Module, tokenizer, prompts: Sequence[str],
                    responses: Sequence[str], beta: float = 0.1, block_size: int = 256) -> torch.Tensor:
    """DPO's implicit reward beta * log(pi(y|x) / pi_ref(y|x)) of each (prompt, response), shape (N,).

    It is the reward model that the DPO policy is optimal for (up to a function of the prompt alone), so it can rank
    any responses to the same prompt, e.g. sampled generations. Both models must share `tokenizer`.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    policy.eval()
    reference.eval()
    return beta * (response_logps(policy, tokenizer, prompts, responses, block_size)
                   - response_logps(reference, tokenizer, prompts, responses, block_size))
