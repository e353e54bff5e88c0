"""Direct Preference Optimization (Rafailov et al., 2023) on top of the SFT model.

DPO fits the policy directly to preference pairs (prompt x, chosen y_w, rejected y_l): the implicit reward
r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) goes into the Bradley-Terry likelihood, so no reward model and no RL
loop are needed. Pieces, each with one job:

- `dpo_loss`, `ipo_loss`: a loss per pair and the implicit rewards from the four log-probs of a batch of pairs;
  `PREFERENCE_LOSSES` names the variants a run can use (DPO, conservative DPO, IPO).
- `make_preference_loss_fn`: the loss of a batch of `fm.logps.PreferenceData` (the policy's log-probs by
  `fm.logps.concatenated_logps`, the reference's cached), with TRL's metric names.
- `DPOConfig` / `dpo_config`: a run's settings, one preset per profile; `dpo_dir`: its folder.

The run itself (build, train, load) is in `fm.dpo_train`; the analysis of a trained policy (the 1.3.1 identity, the
gradient check, rewards by kind, the implicit reward of any response) in `fm.dpo_analysis`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from common import make_config
from common.config import added_field, bookkeeping, check
from common.steps import Batch
from fm.logps import concatenated_logps
from fm.preference import SOURCES
from fm.sft import sft_config
from fm.training import LMTrainConfig, run_folder

Tensor = torch.Tensor
PreferenceLoss = Callable[..., tuple[Tensor, Tensor, Tensor]]  # the signature of `dpo_loss`


def _check_logps(logps: tuple[Tensor, Tensor, Tensor, Tensor], beta: float) -> None:
    shapes = [tuple(x.shape) for x in logps]
    if any(len(s) != 1 for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(f"a preference loss needs four log-prob tensors of the same shape (B,), got shapes {shapes}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (it scales the implicit reward), got {beta}")


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """DPO loss per pair and the implicit rewards, all (B,).

    Inputs: log-probs of the chosen and rejected responses under the policy, then under the reference, each (B,).
    losses = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))); with `label_smoothing` eps > 0 the
    conservative variant -(1 - eps) log sigmoid(h) - eps log sigmoid(-h), which assumes a fraction eps of the labels
    are flipped. Rewards are beta * (pi - ref), detached (they are metrics, not part of the graph).
    """
    _check_logps((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps), beta)
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    ### BEGIN SOLUTION
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    ### END SOLUTION


def ipo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al., 2023): squared distance of the log-ratio margin from 1 / (2 beta); `dpo_loss`'s signature.

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l));  loss = (h - 1 / (2 beta))^2.
    DPO's -log sigmoid(beta h) keeps pushing h up even when the preference is already certain, which overfits
    deterministic preference data; IPO regresses h to a finite target instead. All inputs (B,); returns
    (losses, chosen_rewards, rejected_rewards), each (B,), rewards = beta * log-ratio detached, as `dpo_loss` does.
    """
    _check_logps((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps), beta)
    if label_smoothing != 0.0:
        raise ValueError("IPO has no label smoothing (its target margin already bounds the loss); pass 0.0")
    ### BEGIN SOLUTION
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    ### END SOLUTION


# The losses a DPO run can use (`DPOConfig.loss`); "cdpo" is `dpo_loss` with label smoothing (conservative DPO).
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {"dpo": dpo_loss, "cdpo": dpo_loss, "ipo": ipo_loss}


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 if chosen reward > rejected, 0 if below, 0.5 on a tie (policy = reference gives exactly 0.5)."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


# ---------------------------------------------------------------------------------------------- loss for the loop
def make_preference_loss_fn(beta: float, label_smoothing: float = 0.0, loss: PreferenceLoss = dpo_loss,
                            length_normalize: bool = False):
    """`loss_fn(policy, batch) -> (loss, metrics)` for `common.steps.make_step_fn` / `make_eval_fn`.

    The batch is a `PreferenceData.batch`: policy log-probs come from one concatenated forward pass, the reference
    log-probs from the cache. With `length_normalize`, every log-prob (policy and reference, so each log-ratio) is
    divided by its completion's token count before the loss, as TRL's DPOTrainer does for IPO; otherwise the sums
    of the papers. The loss is the mean over the pairs. Metrics, named as TRL's DPOTrainer names them (detached 0-d
    tensors): loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected (the policy's mean summed log-probs of both sides).
    """

    def loss_fn(policy: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected = concatenated_logps(policy, batch)
        logps = (chosen, rejected, batch["reference_chosen_logps"], batch["reference_rejected_logps"])
        if length_normalize:
            tokens = batch["loss_mask"][:, 1:].sum(-1).clamp_min(1).to(chosen.dtype)  # scored tokens, (2B,)
            n_chosen, n_rejected = tokens.split(chosen.shape[0])
            logps = (logps[0] / n_chosen, logps[1] / n_rejected, logps[2] / n_chosen, logps[3] / n_rejected)
        losses, chosen_rewards, rejected_rewards = loss(*logps, beta=beta, label_smoothing=label_smoothing)
        loss_value = losses.mean()
        return loss_value, {
            "loss": loss_value.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": reward_accuracy(chosen_rewards, rejected_rewards).mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }

    return loss_fn


def pairs_in(batch: Batch) -> int:
    """Pairs of a `PreferenceData.batch`: what the preference losses average over."""
    return batch["reference_chosen_logps"].shape[0]


# ---------------------------------------------------------------------------------------------- run config
@dataclass
class DPOConfig(LMTrainConfig):
    """DPO run: the shared fields of `fm.training.LMTrainConfig` (block_size counts prompt + response tokens,
    batch_size pairs per micro-batch, i.e. 2 x batch_size sequences per policy pass) plus the SFT start, the
    loss and the pairs."""

    sft_profile: str = "quick"  # the policy and the reference start from fm.sft.load_or_train_sft(sft_profile)
    loss: str = "dpo"  # a key of PREFERENCE_LOSSES: dpo | cdpo (needs label_smoothing > 0) | ipo
    beta: float = 0.1  # strength of the KL tie to the reference (the implicit reward's scale)
    label_smoothing: float = 0.0  # conservative DPO: assumed fraction of flipped labels
    length_normalize: bool = False  # IPO only: log-ratios divided by the completion's tokens, as TRL's IPO does
    train_pairs: int = 0  # fixed sources (hh, chitchat): first n training pairs of a seeded shuffle (0 = all)
    pair_seed: int = added_field(0)  # seeds the pairs (sampling or shuffle); `seed` the training (init, batch order)
    val_pairs: int = 48  # held-out pairs for the validation metrics
    eval_batch_size: int = 8  # pairs per validation / reference batch
    # on-policy "sentiment" pairs (fm.preference.sentiment_pairs) and the policy evaluation
    sampled_pairs: int = 256  # "sentiment": training pairs to sample (validation: val_pairs)
    reply_tokens: int = 40  # max new tokens of a sampled reply
    tie_margin: float = 0.1  # pairs whose oracle rewards differ by less are dropped
    sample_batch_size: int = 64  # replies per generation batch: pairs answer half as many prompts twice each
    eval_prompts: int = bookkeeping(200)  # held-out test prompts of fm.dpo_analysis.evaluate_policy
    lora_rank: int = 0  # 0 = full fine-tuning of the policy; else LoRA adapters, merged before saving
    lora_alpha: float = 16.0
    data_sources: ClassVar[tuple[str, ...]] = SOURCES

    def __post_init__(self):
        super().__post_init__()
        for name in ("val_pairs", "eval_batch_size", "sampled_pairs", "reply_tokens", "sample_batch_size",
                     "eval_prompts"):
            check(getattr(self, name) > 0, f"DPOConfig.{name} must be positive, got {getattr(self, name)}")
        check(self.train_pairs >= 0, f"DPOConfig.train_pairs must be >= 0, got {self.train_pairs}")
        check(self.tie_margin >= 0, f"DPOConfig.tie_margin must be >= 0, got {self.tie_margin}")
        check(self.sample_batch_size >= 2, f"DPOConfig.sample_batch_size must be >= 2 (a pair per prompt), got "
                                           f"{self.sample_batch_size}")
        check(self.lora_rank >= 0 and self.lora_alpha > 0, "DPOConfig.lora_rank must be >= 0 and lora_alpha > 0")
        check(not self.length_normalize or self.loss == "ipo", "length_normalize is an IPO option; set loss='ipo'")
        check(self.beta > 0, f"DPOConfig.beta must be > 0, got {self.beta}")
        check(0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        check(self.loss in PREFERENCE_LOSSES, f"DPOConfig.loss must be one of {sorted(PREFERENCE_LOSSES)}, "
                                              f"got {self.loss!r}")
        check(self.loss != "cdpo" or self.label_smoothing > 0, "loss='cdpo' needs label_smoothing > 0")
        check(self.loss != "ipo" or self.label_smoothing == 0, "loss='ipo' has no label smoothing; set it to 0")
        for name in ("train_pairs", "sampled_pairs"):
            check(getattr(self, name) == 0 or getattr(self, name) >= self.examples_per_step,
                  f"{name} ({getattr(self, name)}) must cover one batch of {self.examples_per_step}")


PRESETS = {
    # CI: the tiny SFT model of the smoke profile, a few steps on a handful of sampled pairs.
    "smoke": dict(sft_profile="smoke", run_name="smoke", data_source="sentiment", sampled_pairs=8, train_pairs=16,
                  val_pairs=4, block_size=64, batch_size=2, eval_batch_size=4, steps=4, lr=1e-4, warmup_steps=1,
                  eval_interval=2, reply_tokens=12, sample_batch_size=8, eval_prompts=8),
    # CPU: the quick SFT model (SmolLM2-135M or GPT-2) with LoRA adapters (rank 16 on every projection); offline on 256
    # on-policy sentiment pairs, 40 steps of 8 pairs (1.25 epochs: a 64-step probe reached validation reward accuracy
    # 0.58 / 0.66 / 0.67 / 0.665 after 16 / 32 / 48 / 64 steps, and 24 full fine-tuning steps at lr 7e-5, under one
    # epoch, 0.56), 200 validation pairs, then 200 held-out test prompts. Replies of <= 32 new tokens (sampling,
    # scoring and training time grow with the reply length).
    "quick": dict(sft_profile="quick", run_name="quick", sampled_pairs=256, train_pairs=256, val_pairs=200,
                  block_size=128, batch_size=8, eval_batch_size=32, steps=40, lr=5e-4, warmup_steps=3,
                  eval_interval=20, reply_tokens=32, tie_margin=0.1, sample_batch_size=256, eval_prompts=200,
                  lora_rank=16, lora_alpha=32.0),
    # GPU: the full SFT model (GPT-2 on HH) on all HH-RLHF pairs (offline: 4096 sentiment pairs), the DPO paper's
    # beta, lr and batch 64.
    "full": dict(sft_profile="full", run_name="full", sampled_pairs=4096, val_pairs=512, block_size=512, batch_size=8,
                 grad_accum=8, eval_batch_size=16, steps=2000, lr=1e-6, warmup_steps=150, min_lr_ratio=1.0,
                 eval_interval=200, ckpt_interval=200, log_interval=10, sample_batch_size=256, eval_prompts=1000),
}


def dpo_config(profile: str | None = None, **overrides) -> DPOConfig:
    """The DPO config of `profile` (default $HW3_PROFILE or quick) with `overrides`."""
    return make_config(DPOConfig, PRESETS, profile, **overrides)


def dpo_dir(cfg: DPOConfig) -> Path:
    """Run folder of `cfg`, named by its training-relevant fields and by the SFT run it starts from: the trained
    policy; metrics CSVs and the checkpoint that `resume` continues from in run/."""
    return run_folder("dpo", cfg, f"sft-{sft_config(cfg.sft_profile).digest()}")
