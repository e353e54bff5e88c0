"""Task 1.4: the comparison studies of the LM pipeline, each enhancement against its baseline on the same data and
budget (`notebooks/1_4_lm_enhancement.ipynb`).

- `compare_finetuning`: LoRA vs full fine-tuning (trainable parameters, peak memory, speed, validation loss);
- `compare_decoding`: greedy vs temperature/top-k vs nucleus sampling (distinct-n, length, implicit reward);
- `compare_preference_losses`: DPO vs conservative DPO vs IPO (held-out reward accuracy, margins, log-prob shifts).

Everything else comes from its own module: models and training from `fm.sft` / `fm.dpo`, the KV-cache benchmark
from `fm.generate`, distinct-n from `fm.metrics`, memory probing from `common.memory`, bar plots from
`common.plotting`.
"""

from __future__ import annotations

import gc
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from common import make_config
from common.config import check
from common.memory import peak_memory
from common.params import count_parameters
from fm.data import encode
from fm.dpo import PREFERENCE_LOSSES, dpo_config, train_dpo
from fm.dpo_analysis import implicit_reward, rewards_by_kind
from fm.generate import generate
from fm.metrics import distinct_n
from fm.preference import load_preference_pairs
from fm.sft import HOMEWORK_PROMPT, build_sft, sft_config
from fm.tokenizer import padding_id


@dataclass
class LMEnhanceConfig:
    """Settings of the three comparisons of task 1.4 (`lm_enhance_config(profile)` picks a preset)."""

    profile: str = "quick"  # the SFT / DPO profile whose models, data and presets the experiments reuse
    # 1. LoRA vs full fine-tuning: the SFT setup of `profile` for `ft_steps` steps from the pretrained model
    ft_steps: int = 6
    ft_eval_examples: int = 8
    full_lr: float = 5e-5  # a usual full fine-tuning lr for a ~100M model
    lora_lr: float = 5e-4  # adapters start at zero and take larger steps (the 1.2 quick preset's LoRA settings)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    # 2. decoding: KV cache timing (fm.generate.kv_cache_benchmark) and sampling strategies on the DPO model,
    # scored against the SFT reference
    cache_new_tokens: tuple[int, ...] = (16, 32, 64)
    decode_prompts: int = 8  # held-out preference prompts (the homework prompt first)
    max_new_tokens: int = 32
    decode_batch_size: int = 8
    # 3. preference losses: `train_dpo` of `profile` with a smaller step budget, once per variant
    variants: tuple[str, ...] = ("dpo", "ipo")
    pref_steps: int = 6
    pref_batch_size: int = 2  # pairs per step (2 x that many sequences)
    pref_train_pairs: int = 12
    pref_val_pairs: int = 16
    pref_lr: float = 5e-5
    label_smoothing: float = 0.1  # cDPO's assumed fraction of flipped labels
    seed: int = 0

    def __post_init__(self):
        for name in ("ft_steps", "ft_eval_examples", "lora_rank", "decode_prompts", "max_new_tokens",
                     "decode_batch_size", "pref_steps", "pref_batch_size", "pref_train_pairs", "pref_val_pairs"):
            check(getattr(self, name) > 0, f"LMEnhanceConfig.{name} must be positive, got {getattr(self, name)}")
        check(min(self.full_lr, self.lora_lr, self.pref_lr, self.lora_alpha) > 0, "lrs and lora_alpha must be > 0")
        check(all(n > 0 for n in self.cache_new_tokens), f"cache_new_tokens must be positive: {self.cache_new_tokens}")
        unknown = set(self.variants) - set(PREFERENCE_LOSSES)
        check(not unknown, f"unknown preference variants {sorted(unknown)}; choose from {sorted(PREFERENCE_LOSSES)}")
        check(0 < self.label_smoothing < 0.5, f"label_smoothing must be in (0, 0.5), got {self.label_smoothing}")


PRESETS = {
    "smoke": dict(profile="smoke", ft_steps=2, ft_eval_examples=4, full_lr=1e-3, lora_lr=1e-2, lora_rank=4,
                  lora_alpha=8.0, cache_new_tokens=(4, 8), decode_prompts=2, max_new_tokens=6, decode_batch_size=2,
                  variants=("dpo", "cdpo", "ipo"), pref_steps=1, pref_train_pairs=2, pref_val_pairs=4, pref_lr=1e-4),
    "quick": dict(profile="quick"),
    "full": dict(profile="full", ft_steps=200, ft_eval_examples=256,
                 cache_new_tokens=(64, 128, 256, 512), decode_prompts=256, max_new_tokens=128, decode_batch_size=32,
                 variants=("dpo", "cdpo", "ipo"), pref_steps=300, pref_batch_size=8, pref_train_pairs=4096,
                 pref_val_pairs=512, pref_lr=1e-6),
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
    """A table (one row per method) and the curves behind the figure ({label: (steps, values)})."""

    rows: list[dict]
    curves: dict[str, tuple[list, list]] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)  # example generations, for the decoding comparison
    models: dict[str, nn.Module] = field(default_factory=dict)  # trained models worth reusing, by row name


def compare_finetuning(cfg: LMEnhanceConfig) -> Comparison:
    """Full fine-tuning vs LoRA: the SFT run of `cfg.profile`, same data, batches and step budget, fresh model each.

    Measured per method: trainable parameters, peak extra memory of the training loop (`peak_memory`), mean step
    time, tokens/s, validation loss before and after. Runs: checkpoint_dir()/sft/enhance_<method>_<profile>_<digest>/.
    """
    rows, curves = [], {}
    for method, rank, lr in (("full", 0, cfg.full_lr), (f"LoRA r={cfg.lora_rank}", cfg.lora_rank, cfg.lora_lr)):
        sft_cfg = sft_config(cfg.profile, run_name=f"enhance_{'lora' if rank else 'full'}_{cfg.profile}",
                             steps=cfg.ft_steps, warmup_steps=min(2, cfg.ft_steps - 1), lr=lr, lora_rank=rank,
                             lora_alpha=cfg.lora_alpha, eval_examples=cfg.ft_eval_examples, eval_interval=0,
                             seed=cfg.seed)
        setup = build_sft(sft_cfg)
        trainable, total = count_parameters(setup.model, trainable_only=True), count_parameters(setup.model)
        with peak_memory(setup.trainer.device) as mem:
            setup.trainer.fit(setup.step_fn, setup.eval_fn)
        train, evals = setup.trainer.train_log, setup.trainer.eval_log.rows
        rows.append({
            "method": method, "lr": lr, "trainable params": trainable, "trainable %": 100 * trainable / total,
            "peak extra memory (MB)": mem["peak_mb"], "s / step": _mean_after_first(train.column("step_time")[1]),
            "tokens / s": _mean_after_first(train.column("tokens_per_s")[1]),
            "val loss start": evals[0]["val_loss"], "val loss end": evals[-1]["val_loss"],
        })
        curves[f"{method}: train loss"] = train.column("loss")
        curves[f"{method}: val loss"] = setup.trainer.eval_log.column("val_loss")
        print(f"{method}: memory measured as {mem['method']}")
        del setup
    return Comparison(rows, curves)


# ---------------------------------------------------------------------------------------------- 2. decoding
STRATEGIES = {  # name -> keyword arguments of fm.generate.generate
    "greedy": dict(temperature=0.0),
    "T=0.9, top-k 200": dict(temperature=0.9, top_k=200),  # the homework's sampling settings
    "T=1.0, top-p 0.9": dict(temperature=1.0, top_p=0.9),
    "T=0.7, top-p 0.9": dict(temperature=0.7, top_p=0.9),
}
TURN_HEADER = re.compile(r"\n\s*(Human|Assistant):")  # the model writing the next turn ends its reply


def _left_padded(tokenizer, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as a left-padded (B, T) id tensor and its attention mask, ready for `generate`."""
    ids = [encode(tokenizer, p) for p in prompts]
    width = max(len(x) for x in ids)
    pad = padding_id(tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


@torch.no_grad()
def sample_replies(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
                   seed: int = 0, **decoding) -> list[str]:
    """One reply per prompt, sampled in left-padded batches; a reply ends at EOS or where the model starts the next
    "Human:"/"Assistant:" turn. `decoding`: temperature, top_k, top_p as in `fm.generate.generate`."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    replies = []
    for start in range(0, len(prompts), batch_size):
        input_ids, mask = _left_padded(tokenizer, prompts[start : start + batch_size], device)
        out = generate(model, input_ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id, attention_mask=mask,
                       generator=generator, **decoding)
        for row in out[:, input_ids.shape[1] :].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            replies.append(TURN_HEADER.split(tokenizer.decode(row), maxsplit=1)[0].strip())
    return replies


def decoding_prompts(profile: str, n: int, seed: int = 0) -> list[str]:
    """The homework prompt and n - 1 held-out prompts of the preference validation split of `profile`."""
    pairs = load_preference_pairs("validation", dpo_config(profile).data_source, n - 1 if n > 1 else None, seed)
    return [HOMEWORK_PROMPT, *[p["prompt"] for p in pairs]][:n]


def compare_decoding(models: dict[str, nn.Module], reference: nn.Module, scorer: nn.Module, tokenizer,
                     prompts: Sequence[str], beta: float, max_new_tokens: int, batch_size: int = 16, seed: int = 0,
                     strategies: dict[str, dict] = STRATEGIES) -> Comparison:
    """Each model's replies to `prompts` under each decoding strategy, scored by word distinct-1/2, mean length and
    the implicit reward beta * log(scorer(y|x) / reference(y|x)) (mean and standard error over prompts).

    `scorer` is the DPO policy and `reference` its SFT model; `models` are the generators compared (e.g. both).
    `samples` holds the replies to the first prompt.
    """
    rows, samples = [], {}
    for model_name, model in models.items():
        for name, decoding in strategies.items():
            replies = sample_replies(model, tokenizer, prompts, max_new_tokens, batch_size, seed, **decoding)
            reward = implicit_reward(scorer, reference, tokenizer, prompts, replies, beta=beta)
            words = [r.split() for r in replies]
            rows.append({
                "model": model_name, "decoding": name, "distinct-1": distinct_n(words, 1),
                "distinct-2": distinct_n(words, 2), "mean words": statistics.fmean(len(w) for w in words),
                "implicit reward": reward.mean().item(),
                "reward s.e.": (reward.std() / len(reward) ** 0.5).item() if len(reward) > 1 else 0.0,
            })
            samples[f"{model_name}, {name}"] = replies[0]
    return Comparison(rows, samples=samples)


# ---------------------------------------------------------------------------------------------- 3. preference losses
def compare_preference_losses(cfg: LMEnhanceConfig) -> Comparison:
    """`train_dpo` of `cfg.profile` once per variant in `cfg.variants` (same SFT start, pairs, batches, steps, lr).

    Rows: held-out reward accuracy (all pairs and per kind of rejected reply), mean held-out reward margin, how far
    the policy moved the held-out chosen and rejected replies' log-probabilities from the reference, mean step time.
    The trained policies are kept in `models` (the DPO one can score generations when 1.3's run is missing).
    """
    rows, models = [], {}
    for variant in cfg.variants:
        dcfg = dpo_config(cfg.profile, run_name=f"enhance_{variant}_{cfg.profile}", steps=cfg.pref_steps,
                          batch_size=cfg.pref_batch_size, train_pairs=cfg.pref_train_pairs,
                          val_pairs=cfg.pref_val_pairs, lr=cfg.pref_lr,
                          warmup_steps=min(2, cfg.pref_steps - 1), eval_interval=0, loss=variant,
                          label_smoothing=cfg.label_smoothing if variant == "cdpo" else 0.0, seed=cfg.seed)
        result = train_dpo(dcfg)
        final = result.trainer.eval_log.rows[-1]
        by_kind = rewards_by_kind(result.policy, result.val_data, dcfg.beta, dcfg.eval_batch_size)
        name = {"dpo": "DPO", "cdpo": f"cDPO (eps={cfg.label_smoothing})", "ipo": "IPO"}[variant]
        rows.append({
            "loss": name, "val reward acc": final["val_rewards/accuracies"],
            **{f"acc {r['kind']}": r["reward_acc"] for r in by_kind if r["kind"] != "all"},
            "val margin": final["val_rewards/margins"],
            "chosen log-prob shift": final["val_logps/chosen"] - result.val_data.reference_chosen.mean().item(),
            "rejected log-prob shift": final["val_logps/rejected"] - result.val_data.reference_rejected.mean().item(),
            "s / step": _mean_after_first(result.trainer.train_log.column("step_time")[1]),
        })
        models[name] = result.policy
        del result
        gc.collect()
    return Comparison(rows, models=models)
