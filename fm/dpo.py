"""Direct Preference Optimization (Rafailov et al., 2023) on top of the SFT model.

DPO fits the policy directly to preference pairs (prompt x, chosen y_w, rejected y_l): the implicit reward
r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) goes into the Bradley-Terry likelihood, so no reward model and no RL
loop are needed. Pieces, each with one job:

- `sequence_logps`: summed log-probability of the response tokens of each sequence.
- `dpo_loss`: the loss and the implicit rewards from the four log-probs of a batch of pairs.
- `concatenated_logps`: chosen and rejected through the policy in ONE forward pass.
- `build_preference_data`: tokenized pairs with the frozen SFT model's log-probs, computed once and cached (on a CPU
  a reference forward pass in every step would cost a third of the step).
- `train_dpo`: the training run, on the package's one training loop (`common.trainer.Trainer`).
- `implicit_reward`: scores any (prompt, response) with beta * log(pi / pi_ref) (used by the enhancement task).
- `conditional_vs_joint` and `gradient_weighting_check`: the numerical checks of 1.3.1 and of the DPO gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common import checkpoint_dir, get_device, make_config, seed_everything
from common.config import check
from common.trainer import EvalFn, StepFn, Trainer, warmup_cosine
from fm.data import IGNORE_INDEX, collate
from fm.preference import Pair, collate_pairs, is_scored, load_preference_pairs, tokenize_pair, tokenize_response

Batch = dict[str, torch.Tensor]
PreferenceLoss = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # the signature of `dpo_loss`


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the masked tokens of each sequence.

    logits (B, T, V) from a causal LM on `labels` (B, T) (the input ids); loss_mask (B, T) is 1 on the response
    tokens. Position t's logits predict token t+1 (the usual one-token shift), so the first token is never scored.
    Returns (B,) in float32 (or the logits' dtype if wider).
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V), labels (B, T) and loss_mask (B, T); got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)} and {tuple(loss_mask.shape)}"
        )
    logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    targets, mask = labels[:, 1:], loss_mask[:, 1:].to(logits.dtype)
    targets = targets.masked_fill(mask == 0, 0)  # masked positions may hold -100; any valid id will do
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * mask).sum(-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss per pair and the implicit rewards, all (B,).

    losses = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))); with `label_smoothing` eps > 0 the
    conservative variant -(1 - eps) log sigmoid(h) - eps log sigmoid(-h), which assumes a fraction eps of the labels
    are flipped. Rewards are beta * (pi - ref), detached (they are metrics, not part of the graph).
    """
    logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    shapes = [tuple(x.shape) for x in logps]
    if any(len(s) != 1 for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(f"dpo_loss needs four log-prob tensors of the same shape (B,), got shapes {shapes}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (it scales the implicit reward), got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 if chosen reward > rejected, 0 if below, 0.5 on a tie (policy = reference gives exactly 0.5)."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


def concatenated_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs from one forward pass on the concatenated batch.

    `batch` holds input_ids, attention_mask and loss_mask of shape (2B, T): rows 0..B-1 are the chosen responses,
    rows B..2B-1 the rejected ones (see `PairCollator`). Returns (chosen_logps, rejected_logps), each (B,).
    """
    n = batch["input_ids"].shape[0]
    if n % 2:
        raise ValueError(f"a concatenated batch has chosen then rejected rows, so an even row count; got {n}")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    return logps[: n // 2], logps[n // 2 :]


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


# ---------------------------------------------------------------------------------------------- data with references
def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def pair_logps(model: nn.Module, examples: Sequence[tuple[dict, dict]], pad_token_id: int, batch_size: int,
               desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (chosen, rejected), each (N,) on the CPU, of tokenized pairs in consecutive chunks of `batch_size`."""
    device = next(model.parameters()).device
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    chosen, rejected = [], []
    for chunk in tqdm(chunks, desc=desc, disable=desc is None, dynamic_ncols=True):
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_token_id).items()}
        c, r = concatenated_logps(model, batch)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


@dataclass
class PreferenceData:
    """Tokenized pairs with the reference model's log-probs, computed once (the cached reference)."""

    examples: list[tuple[dict, dict]]
    kinds: list[str]
    reference_chosen: torch.Tensor  # (N,)
    reference_rejected: torch.Tensor  # (N,)
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: Sequence[int]) -> Batch:
        """The concatenated batch of pairs `indices` (see `collate_pairs`) with their reference log-probs."""
        batch = collate_pairs([self.examples[i] for i in indices], self.pad_token_id)
        batch["reference_chosen_logps"] = self.reference_chosen[list(indices)]
        batch["reference_rejected_logps"] = self.reference_rejected[list(indices)]
        return batch


def build_preference_data(pairs: Sequence[Pair], tokenizer, reference: nn.Module, block_size: int, batch_size: int,
                          desc: str = "reference log-probs") -> PreferenceData:
    """Tokenize `pairs` and cache the reference's log-probs of them (chunks of `batch_size`, in order)."""
    examples, kinds = [], []
    for pair in pairs:
        chosen, rejected = tokenize_pair(tokenizer, pair, block_size)
        if is_scored(chosen) and is_scored(rejected):
            examples.append((chosen, rejected))
            kinds.append(pair.get("kind", ""))
    if not examples:
        raise ValueError(f"no preference pair keeps a response token within block_size={block_size}")
    chosen, rejected = pair_logps(reference.eval(), examples, pad_id(tokenizer), batch_size, desc=desc)
    return PreferenceData(examples, kinds, chosen, rejected, pad_id(tokenizer))


# ---------------------------------------------------------------------------------------------- loss for the loop
def make_preference_loss_fn(beta: float, label_smoothing: float = 0.0, loss: PreferenceLoss = dpo_loss):
    """`loss_fn(policy, batch) -> (loss, metrics)` for `fm.sft.make_step_fn` / `make_eval_fn`.

    The batch is a `PreferenceData.batch`: policy log-probs come from one concatenated forward pass, the
    reference log-probs from the cache. Metrics: loss, reward accuracy, chosen/rejected rewards, margin, the
    policy's mean log-probs of both sides, and tokens (for tokens/s).
    """

    def loss_fn(policy: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = concatenated_logps(policy, batch)
        losses, chosen_rewards, rejected_rewards = loss(
            chosen, rejected, batch["reference_chosen_logps"], batch["reference_rejected_logps"],
            beta=beta, label_smoothing=label_smoothing,
        )
        return losses.mean(), {
            "loss": losses.mean().item(),
            "reward_acc": reward_accuracy(chosen_rewards, rejected_rewards).mean().item(),
            "chosen_reward": chosen_rewards.mean().item(),
            "rejected_reward": rejected_rewards.mean().item(),
            "margin": (chosen_rewards - rejected_rewards).mean().item(),
            "chosen_logp": chosen.mean().item(),
            "rejected_logp": rejected.mean().item(),
            "tokens": float(batch["attention_mask"].sum()),
        }

    return loss_fn


# ---------------------------------------------------------------------------------------------- training
@dataclass
class DPOConfig:
    sft_profile: str = "quick"  # the policy and the reference start from fm.sft.load_or_train_sft(sft_profile)
    run_name: str = "quick"  # outputs go to checkpoint_dir()/dpo/<run_name>/
    data_source: str = "auto"  # auto | hh | chitchat (fm.preference.load_preference_pairs)
    train_pairs: int = 0  # first n training pairs of a seeded shuffle (0 = all)
    val_pairs: int = 48  # held-out pairs for the validation metrics
    block_size: int = 128  # tokens of prompt + response; the oldest prompt turns go first
    beta: float = 0.1  # strength of the KL tie to the reference (the implicit reward's scale)
    label_smoothing: float = 0.0  # conservative DPO: assumed fraction of flipped labels
    batch_size: int = 4  # pairs per micro-batch: 2 x batch_size sequences in one forward pass
    grad_accum: int = 1
    eval_batch_size: int = 8  # pairs per validation / reference batch
    steps: int = 60
    lr: float = 1e-5
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 20
    ckpt_interval: int = 0  # 0: checkpoint at the end only
    bf16: bool = False
    seed: int = 0
    device: str | None = None  # None: common.get_device()

    def __post_init__(self):
        for name in ("val_pairs", "block_size", "batch_size", "grad_accum", "eval_batch_size", "steps"):
            check(getattr(self, name) > 0, f"DPOConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("train_pairs", "warmup_steps", "weight_decay", "grad_clip", "eval_interval", "ckpt_interval"):
            check(getattr(self, name) >= 0, f"DPOConfig.{name} must be >= 0, got {getattr(self, name)}")
        check(self.beta > 0, f"DPOConfig.beta must be > 0, got {self.beta}")
        check(0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        check(self.lr > 0, f"DPOConfig.lr must be positive, got {self.lr}")
        check(self.warmup_steps < self.steps, f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.data_source in ("auto", "hh", "chitchat"),
              f"data_source must be auto, hh or chitchat, got {self.data_source!r}")
        check(self.train_pairs == 0 or self.train_pairs >= self.batch_size * self.grad_accum,
              f"train_pairs ({self.train_pairs}) must cover one batch of {self.batch_size * self.grad_accum}")


PRESETS = {
    # CI: the tiny SFT model of the smoke profile, a few steps on a handful of fixture pairs.
    "smoke": dict(sft_profile="smoke", run_name="smoke", data_source="chitchat", train_pairs=16, val_pairs=8,
                  block_size=64, batch_size=2, eval_batch_size=4, steps=4, lr=1e-4, warmup_steps=1, eval_interval=2),
    # CPU: the quick SFT model (SmolLM2-135M or GPT-2), full fine-tuning, one epoch of 48 pairs in 24 steps of 2.
    "quick": dict(sft_profile="quick", run_name="quick", train_pairs=48, val_pairs=24, block_size=128,
                  batch_size=2, eval_batch_size=8, steps=24, lr=2e-5, warmup_steps=2, eval_interval=8),
    # GPU: the full SFT model (GPT-2 on HH) on all HH-RLHF pairs, the DPO paper's beta, lr and batch 64.
    "full": dict(sft_profile="full", run_name="full", val_pairs=512, block_size=512, batch_size=8, grad_accum=8,
                 eval_batch_size=16, steps=2000, lr=1e-6, warmup_steps=150, min_lr_ratio=1.0, eval_interval=200,
                 ckpt_interval=200),
}


def dpo_config(profile: str | None = None, **overrides) -> DPOConfig:
    """The DPO config of `profile` (default $HW3_PROFILE or quick) with `overrides`."""
    return make_config(DPOConfig, PRESETS, profile, **overrides)


@dataclass
class DPOSetup:
    """Everything `Trainer.fit` needs for one DPO run (what `train_dpo` runs; tests drive it directly)."""

    cfg: DPOConfig
    policy: nn.Module  # trained; starts as a copy of the reference
    reference: nn.Module  # the frozen SFT model
    tokenizer: object
    trainer: Trainer  # train_log / eval_log hold the metrics
    step_fn: StepFn
    eval_fn: EvalFn
    train_data: PreferenceData
    val_data: PreferenceData


def build_dpo(cfg: DPOConfig, loss: PreferenceLoss = dpo_loss, model: nn.Module | None = None,
              tokenizer=None) -> DPOSetup:
    """Reference, policy, data with cached reference log-probs, and the trainer for `cfg`.

    The reference is `model` if given, else `fm.sft.load_or_train_sft(cfg.sft_profile)` (trained first when it is
    not saved yet); it is frozen, and the policy is a copy of it. `loss` has the signature of `dpo_loss` (e.g. IPO).
    """
    from fm.sft import build_optimizer, context_length, load_or_train_sft, make_eval_fn, make_step_fn

    seed_everything(cfg.seed)
    reference, tokenizer = (model, tokenizer) if model is not None else load_or_train_sft(cfg.sft_profile)
    if tokenizer is None:
        raise ValueError("build_dpo got a model without its tokenizer")
    if cfg.block_size > context_length(reference):
        raise ValueError(f"block_size {cfg.block_size} exceeds the model's context length {context_length(reference)}")
    device = get_device(cfg.device)
    reference.to(device).eval().requires_grad_(False)
    policy = disable_dropout(copy.deepcopy(reference).requires_grad_(True))

    train_pairs = load_preference_pairs("train", cfg.data_source, cfg.train_pairs or None, cfg.seed)
    val_pairs = load_preference_pairs("validation", cfg.data_source, cfg.val_pairs, cfg.seed)
    train = build_preference_data(train_pairs, tokenizer, reference, cfg.block_size, cfg.eval_batch_size,
                                  desc="reference log-probs (train)")
    val = build_preference_data(val_pairs, tokenizer, reference, cfg.block_size, cfg.eval_batch_size,
                                desc="reference log-probs (val)")
    if len(train) < cfg.batch_size * cfg.grad_accum:
        raise ValueError(f"{len(train)} training pairs cannot fill a batch of {cfg.batch_size * cfg.grad_accum}")
    print(f"DPO: {len(train)} train / {len(val)} validation pairs of <= {cfg.block_size} tokens, beta={cfg.beta}")

    optimizer = build_optimizer(policy, cfg.lr, cfg.weight_decay)
    trainer = Trainer(
        dpo_dir(cfg), {"policy": policy}, {"policy": optimizer}, steps=cfg.steps,
        schedulers={"policy": warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)},
        grad_clip=cfg.grad_clip or None, eval_interval=cfg.eval_interval, ckpt_interval=cfg.ckpt_interval,
        device=device, bf16=cfg.bf16, desc="dpo",
    )
    loss_fn = make_preference_loss_fn(cfg.beta, cfg.label_smoothing, loss)
    step_fn = make_step_fn(trainer, policy, loss_fn, train.batch, n_examples=len(train), batch_size=cfg.batch_size,
                           grad_accum=cfg.grad_accum, seed=cfg.seed)
    # the same chunks as the reference pass, so at step 0 policy and reference rewards tie exactly
    val_batches = [val.batch(range(i, min(i + cfg.eval_batch_size, len(val))))
                   for i in range(0, len(val), cfg.eval_batch_size)]
    eval_fn = make_eval_fn(trainer, policy, loss_fn, val_batches)
    return DPOSetup(cfg, policy, reference, tokenizer, trainer, step_fn, eval_fn, train, val)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout of `model` to p = 0: the rewards compare the policy with the reference in eval mode, so a
    dropout-noised policy would start with a nonzero, random margin (and a loss above log 2)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def dpo_dir(cfg: DPOConfig) -> Path:
    """Run folder of `cfg`: metrics CSVs and the checkpoint that `resume` continues from."""
    return checkpoint_dir() / "dpo" / cfg.run_name


def train_dpo(cfg: DPOConfig, resume: bool = False, loss: PreferenceLoss = dpo_loss, model: nn.Module | None = None,
              tokenizer=None) -> DPOSetup:
    """Fine-tune a copy of the SFT model on preference pairs with `loss` (DPO by default); returns the setup.

    The reference log-probs of every pair are computed once before training (the SFT model is frozen, so they never
    change); the policy then needs one forward pass of chosen + rejected per step. The step and eval functions are
    SFT's (`fm.sft.make_step_fn`, `make_eval_fn`) on `common.trainer.Trainer`; with `resume`, training continues from
    the checkpoint in `dpo_dir(cfg)`. `model`/`tokenizer`: the SFT model, as in `build_dpo`. The trained policy is
    returned in eval mode.
    """
    setup = build_dpo(cfg, loss, model, tokenizer)
    setup.trainer.fit(setup.step_fn, setup.eval_fn, resume=resume)
    setup.policy.eval()
    return setup


# ---------------------------------------------------------------------------------------------- evaluation
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
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id(tokenizer)).items()}
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
