"""A DPO run (`fm.dpo`: its loss and config) on the package's one training loop: `build_dpo` (reference, policy,
pairs with cached reference log-probs, trainer), `train_dpo` (trains and saves the policy, returns a `DPORun`) and
`load_dpo_models` (the saved policy and its reference).

Several GPUs: `torchrun --nproc_per_node=8 -m fm.dpo_train train --profile full` (or HW3_NPROC=8, which makes
`train_dpo` launch that itself). The ranks share out the on-policy sampling, the reference pass, the training batches
and the validation batches; rank 0 writes the pair and reference caches, the checkpoints and the policy.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

from torch import nn

from common import dist, get_device, get_profile, seed_everything
from common.run import Run
from common.steps import make_eval_fn, make_step_fn
from common.trainer import EvalFn, StepFn, Trainer
from fm.dpo import PREFERENCE_LOSSES, DPOConfig, dpo_config, dpo_dir, make_preference_loss_fn, pairs_in
from fm.logps import PreferenceData, reference_data
from fm.lora import apply_lora, merge_lora
from fm.preference import Pair, load_preference_pairs, resolve_pair_source, sentiment_pairs
from fm.pretrained import load_lm
from fm.sft import load_or_train_sft, sft_config
from fm.training import check_block_size, is_saved, make_trainer, save_trained


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


def build_dpo(cfg: DPOConfig, model: nn.Module | None = None, tokenizer=None) -> DPOSetup:
    """Reference, policy, data with cached reference log-probs, and the trainer for `cfg`.

    The reference is `model` if given, else `fm.sft.load_or_train_sft(cfg.sft_profile)` (trained first when it is
    not saved yet); it is frozen, and the policy is a copy of it. The loss is `PREFERENCE_LOSSES[cfg.loss]`. The run
    folder is keyed by `cfg`: a given `model` should be the SFT model of `cfg.sft_profile`.
    """
    seed_everything(cfg.seed)
    if model is None:
        sft = load_or_train_sft(cfg.sft_profile)
        model, tokenizer = sft.model, sft.tokenizer
    reference = model
    if tokenizer is None:
        raise ValueError("build_dpo got a model without its tokenizer")
    check_block_size(cfg.block_size, reference)
    reference.to(get_device(cfg.device)).eval().requires_grad_(False)
    policy = disable_dropout(copy.deepcopy(reference).requires_grad_(True))
    if cfg.lora_rank:
        apply_lora(policy, cfg.lora_rank, cfg.lora_alpha)

    train_pairs, val_pairs = preference_pairs(cfg, reference, tokenizer)
    train = reference_data(train_pairs, tokenizer, reference, cfg.block_size, cfg.eval_batch_size,
                           desc="reference log-probs (train)")
    val = reference_data(val_pairs, tokenizer, reference, cfg.block_size, cfg.eval_batch_size,
                         desc="reference log-probs (val)")
    if len(train) < cfg.examples_per_step:
        raise ValueError(f"{len(train)} training pairs cannot fill a batch of {cfg.examples_per_step}")
    if dist.is_main_process():
        print(f"DPO ({cfg.loss}): {len(train)} train / {len(val)} validation pairs of <= {cfg.block_size} tokens, "
          f"beta={cfg.beta}")

    trainer = make_trainer(cfg, policy, dpo_dir(cfg) / "run", desc="dpo")
    loss_fn = make_preference_loss_fn(cfg.beta, cfg.label_smoothing, PREFERENCE_LOSSES[cfg.loss], cfg.length_normalize)
    step_fn = make_step_fn(trainer, policy, loss_fn, train.batch, n_examples=len(train), batch_size=cfg.batch_size,
                           grad_accum=cfg.grad_accum, seed=cfg.seed, items_fn=pairs_in)
    # the same chunks as the reference pass, so at step 0 policy and reference rewards tie exactly
    val_batches = [val.batch(range(i, min(i + cfg.eval_batch_size, len(val))))
                   for i in range(0, len(val), cfg.eval_batch_size)]
    eval_fn = make_eval_fn(trainer, policy, loss_fn, val_batches, items_fn=pairs_in)
    return DPOSetup(cfg, policy, reference, tokenizer, trainer, step_fn, eval_fn, train, val)


def preference_pairs(cfg: DPOConfig, reference: nn.Module, tokenizer) -> tuple[list[Pair], list[Pair]]:
    """(train, validation) pairs of `cfg.data_source`; "sentiment" (the offline default of "auto") samples them from
    `reference`, the SFT policy (`fm.preference.sentiment_pairs`, cached)."""
    source = resolve_pair_source(cfg.data_source)
    if source != "sentiment":
        return (load_preference_pairs("train", source, cfg.train_pairs or None, cfg.pair_seed),
                load_preference_pairs("validation", source, cfg.val_pairs, cfg.pair_seed))
    world = dist.world_size()  # the ranks share out each batch of prompts (`sentiment_pairs`)
    if cfg.sample_batch_size % (2 * world):
        raise ValueError(f"sample_batch_size {cfg.sample_batch_size} replies answer {cfg.sample_batch_size / 2:g} "
                         f"prompts (pairs) per generation batch, {cfg.sample_batch_size / 2 / world:g} per rank with "
                         f"NPROC={world}; a rank needs a whole number of pairs (both replies of a prompt): set "
                         f"sample_batch_size to a multiple of {2 * world}")
    sampling = dict(max_new_tokens=cfg.reply_tokens, margin=cfg.tie_margin, batch_size=cfg.sample_batch_size // 2,
                    seed=cfg.pair_seed)
    return (sentiment_pairs(reference, tokenizer, "train", cfg.sampled_pairs, **sampling),
            sentiment_pairs(reference, tokenizer, "validation", cfg.val_pairs, **sampling))


@dataclass
class DPORun(Run[DPOConfig, nn.Module]):
    """A DPO run: `model` is the trained policy (LoRA merged, eval mode), saved in `folder` = `dpo_dir(config)`; the
    rows are the trainer's logs (in `folder/run/`)."""

    reference: nn.Module  # the frozen SFT model
    tokenizer: object
    train_data: PreferenceData
    val_data: PreferenceData


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout of `model` to p = 0: the rewards compare the policy with the reference in eval mode, so a
    dropout-noised policy would start with a nonzero, random margin (and a loss above log 2)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def train_dpo(cfg: DPOConfig, resume: bool = False, model: nn.Module | None = None, tokenizer=None) -> DPORun:
    """Fine-tune a copy of the SFT model on preference pairs with `PREFERENCE_LOSSES[cfg.loss]`; returns the run.

    The reference log-probs of every pair are computed once before training (the SFT model is frozen, so they never
    change); the policy then needs one forward + backward pass of chosen + rejected per step, on
    `common.trainer.Trainer`. With `resume`, training continues from the checkpoint in `dpo_dir(cfg)/run/`.
    `model`/`tokenizer`: the SFT model, as in `build_dpo`. The trained policy is saved to `dpo_dir(cfg)`
    (`load_dpo_models` reads it) and returned in eval mode.

    With HW3_NPROC=N > 1 (and not already under torchrun), the run trains in N processes (`python -m fm.dpo_train
    train`, whose reference is `load_or_train_sft(cfg.sft_profile)`), then this call loads the finished run rank 0
    saved.
    """
    if dist.launch_requested():
        dist.launch_run("fm.dpo_train", cfg, dpo_config(get_profile()), get_profile(), resume)
        resume = True  # below: the caches and the finished checkpoint load, no step runs
    setup = build_dpo(cfg, model, tokenizer)
    setup.trainer.fit(setup.step_fn, setup.eval_fn, resume=resume)
    policy = merge_lora(setup.policy).eval()
    save_trained(policy, setup.tokenizer, cfg, dpo_dir(cfg))
    return DPORun(cfg, dpo_dir(cfg), policy, setup.trainer.train_log.rows, setup.trainer.eval_log.rows,
                  setup.reference, setup.tokenizer, setup.train_data, setup.val_data)


def load_dpo_models(profile: str, fallback: nn.Module | None = None) -> tuple[nn.Module, nn.Module, object, float]:
    """(DPO policy, SFT reference, tokenizer, beta) of `dpo_config(profile)`, both models in eval mode.

    The reference is `load_or_train_sft(cfg.sft_profile)`. The policy is the one `train_dpo` saved in `dpo_dir(cfg)`;
    without it, `fallback` (a DPO policy of the same reference) if given, else the run is trained (resuming a
    partial run). It prints which.
    """
    cfg = dpo_config(profile)
    out = dpo_dir(cfg)
    if not is_saved(out) and fallback is None:
        print(f"no DPO policy in {out}; training it ({cfg.steps} steps)")
        run = train_dpo(cfg, resume=True)
        return run.model, run.reference, run.tokenizer, cfg.beta
    sft = load_or_train_sft(cfg.sft_profile)
    reference, tokenizer = sft.model, sft.tokenizer
    if is_saved(out):
        print(f"loading the DPO policy from {out}")
        policy, _ = load_lm(out, device=cfg.device, attn_impl=sft_config(cfg.sft_profile).attn_impl, verbose=False)
    else:
        print(f"no DPO policy in {out}; using the given DPO policy instead")
        policy = fallback
    return policy.eval(), reference.eval().requires_grad_(False), tokenizer, cfg.beta


def main(argv: list[str] | None = None) -> None:
    """`python -m fm.dpo_train train --profile full [--set key=json ...] [--resume]`, in one process or under
    torchrun."""
    args = dist.train_args(argv, "Direct Preference Optimization of fm.dpo_train (the run of notebook 1_3)")
    with dist.distributed():
        train_dpo(dpo_config(args.profile, **args.overrides), resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
