"""Task 1.4: measured enhancements of the LM pipeline.

New pieces only; models, generation, SFT, LoRA and DPO come from their own modules:
- `distinct_n`: the repetition measure of a set of generations (unique n-grams / all n-grams);
- `ipo_loss`: the IPO objective with the signature of `fm.dpo.dpo_loss`, a drop-in loss for `fm.dpo.train_dpo`;
- `peak_memory`: peak memory of a block of code (CUDA allocator peak, or the process's peak RSS on CPU);
- the three experiments of `notebooks/1_4_lm_enhancement.ipynb`, each on the same data and budget as its baseline:
  `compare_finetuning` (LoRA vs full fine-tuning), `kv_cache_benchmark` and `compare_decoding` (greedy vs
  temperature/top-k vs nucleus sampling), `compare_preference_losses` (DPO vs conservative DPO vs IPO).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import gc
import re
import resource
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from common import make_config
from common.config import check
from common.plotting import save_figure
from fm.data import encode
from fm.dpo import dpo_config, dpo_dir, dpo_loss, implicit_reward, rewards_by_kind, train_dpo
from fm.generate import generate
from fm.lora import count_parameters
from fm.preference import load_preference_pairs
from fm.sft import HOMEWORK_PROMPT, build_sft, load_or_train_sft, sft_config


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


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al., 2023): squared distance of the log-ratio margin from 1 / (2 beta).

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l));  loss = (h - 1 / (2 beta))^2.
    DPO's -log sigmoid(beta h) keeps pushing h up even when the preference is already certain, which overfits
    deterministic preference data; IPO regresses h to a finite target instead. All inputs (B,); returns
    (losses, chosen_rewards, rejected_rewards), each (B,), rewards = beta * log-ratio detached, as `dpo_loss` does.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if label_smoothing != 0.0:
        raise ValueError("IPO has no label smoothing (its target margin already bounds the loss); pass 0.0")
    logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    if any(t.dim() != 1 for t in logps) or len({t.shape[0] for t in logps}) != 1:
        shapes = [tuple(t.shape) for t in logps]
        raise ValueError(f"all four log-prob tensors must have the same shape (B,), got {shapes}")
    chosen_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_ratio = policy_rejected_logps - reference_rejected_logps
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _rss_kib(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in KiB; None elsewhere."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def peak_memory(device: torch.device | str) -> Iterator[dict]:
    """Measure the peak extra memory of the block; the yielded dict gets `peak_mb` and `method` on exit.

    CUDA: `torch.cuda.max_memory_allocated` above the memory allocated on entry. CPU: tracemalloc cannot see
    torch's allocator, so we read the process's peak resident set size: reset the peak mark on entry (Linux) and
    report peak - resident on entry; without the reset we fall back to the growth of `ru_maxrss`, which only sees
    memory above the earlier peak of the process (an underestimate, said so in `method`).
    """
    device = torch.device(device)
    result: dict = {}
    _release_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.update(peak_mb=(torch.cuda.max_memory_allocated(device) - start) / 2**20, method="cuda max allocated")
        return
    if _reset_rss_peak() and _rss_kib("VmRSS") is not None:
        start = _rss_kib("VmRSS")
        yield result
        result.update(peak_mb=(_rss_kib("VmHWM") - start) / 1024, method="peak RSS - RSS at start (VmHWM reset)")
        return
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    yield result
    end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    result.update(peak_mb=(end - start) / 2**20, method="ru_maxrss growth (lower bound)")


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so an earlier run's leftovers do not hide the next
    run's growth in RSS."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and sys.platform.startswith("linux"):
        ctypes.CDLL(libc).malloc_trim(0)


# ---------------------------------------------------------------------------------------------- experiment config
@dataclass
class EnhanceConfig:
    profile: str = "quick"  # the SFT / DPO profile whose models, data and presets the experiments reuse
    # 1. LoRA vs full fine-tuning: the SFT setup of `profile` for `ft_steps` steps from the pretrained model
    ft_steps: int = 6
    ft_eval_examples: int = 8
    full_lr: float = 5e-5  # a usual full fine-tuning lr for a ~100M model
    lora_lr: float = 5e-4  # adapters start at zero and take larger steps (the 1.2 quick preset's LoRA settings)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    # 2. decoding: KV cache timing and sampling strategies on the DPO model, scored against the SFT reference
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
            check(getattr(self, name) > 0, f"EnhanceConfig.{name} must be positive, got {getattr(self, name)}")
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


def enhance_config(profile: str | None = None, **overrides) -> EnhanceConfig:
    """The experiment config of `profile` (default $HW3_PROFILE or quick) with `overrides`."""
    return make_config(EnhanceConfig, PRESETS, profile, **overrides)


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


def compare_finetuning(cfg: EnhanceConfig) -> Comparison:
    """Full fine-tuning vs LoRA: the SFT run of `cfg.profile`, same data, batches and step budget, fresh model each.

    Measured per method: trainable parameters, peak extra memory of the training loop (`peak_memory`), mean step
    time, tokens/s, validation loss before and after. The runs go to checkpoint_dir()/sft/enhance_<method>_*/.
    """
    rows, curves = [], {}
    for method, rank, lr in (("full", 0, cfg.full_lr), (f"LoRA r={cfg.lora_rank}", cfg.lora_rank, cfg.lora_lr)):
        sft_cfg = sft_config(cfg.profile, run_name=f"enhance_{'lora' if rank else 'full'}_{cfg.profile}",
                             steps=cfg.ft_steps, warmup_steps=min(2, cfg.ft_steps - 1), lr=lr, lora_rank=rank,
                             lora_alpha=cfg.lora_alpha, eval_examples=cfg.ft_eval_examples, eval_interval=0,
                             seed=cfg.seed)
        setup = build_sft(sft_cfg)
        trainable, total = count_parameters(setup.model)
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


def load_dpo_models(profile: str, fallback: nn.Module | None = None) -> tuple[nn.Module, nn.Module, object, float]:
    """(DPO policy, SFT reference, tokenizer, beta) of `profile`, both models in eval mode.

    The reference is `load_or_train_sft`. The policy is the finished `train_dpo` run of the profile (1.3), read from
    its trainer checkpoint; without one, `fallback` (a DPO policy of the same reference, e.g. from
    `compare_preference_losses`) if given, else the run is trained (resuming a partial run). It prints which.
    """
    cfg = dpo_config(profile)
    path = dpo_dir(cfg) / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None
    finished = state is not None and state["step"] >= cfg.steps
    if not finished and fallback is None:
        print(f"no finished DPO run in {path.parent}; training it ({cfg.steps} steps)")
        result = train_dpo(cfg, resume=True)
        return result.policy, result.reference, result.tokenizer, cfg.beta
    reference, tokenizer = load_or_train_sft(cfg.sft_profile)
    if finished:
        print(f"loading the DPO policy from {path} (step {state['step']})")
        policy = copy.deepcopy(reference)
        policy.load_state_dict(state["modules"]["policy"])
    else:
        print(f"no finished DPO run in {path.parent}; using the given DPO policy instead")
        policy = fallback
    del state
    return policy.eval(), reference.eval().requires_grad_(False), tokenizer, cfg.beta


def _left_padded(tokenizer, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as a left-padded (B, T) id tensor and its attention mask, ready for `generate`."""
    ids = [encode(tokenizer, p) for p in prompts]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def kv_cache_benchmark(model: nn.Module, tokenizer, new_tokens: Sequence[int], prompt: str = HOMEWORK_PROMPT
                       ) -> Comparison:
    """Greedy generation of n new tokens (no early stop) with and without the KV cache, for each n in `new_tokens`.

    Without the cache every step re-runs the whole prefix (quadratic in n); with it a step runs one token against
    the cached keys and values. Rows: n, seconds and tokens/s of both, speed-up, and whether the tokens are equal.
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([encode(tokenizer, prompt)], device=device)
    run = lambda n, cache: generate(model, input_ids, n, temperature=0.0, use_cache=cache)
    run(2, True)  # warm-up: first-call allocations
    rows = []
    for n in new_tokens:
        cached_s, uncached_s = _seconds(lambda: run(n, True)), _seconds(lambda: run(n, False))  # noqa: B023
        rows.append({"new tokens": n, "cached (s)": cached_s, "uncached (s)": uncached_s,
                     "cached tokens/s": n / cached_s, "uncached tokens/s": n / uncached_s,
                     "speed-up": uncached_s / cached_s, "same tokens": bool(torch.equal(run(n, True), run(n, False)))})
    curves = {name: ([r["new tokens"] for r in rows], [r[f"{name} (s)"] for r in rows])
              for name in ("cached", "uncached")}
    return Comparison(rows, curves)


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


def plot_grouped_bars(rows: Sequence[dict], label_keys: Sequence[str], panels: dict[str, Sequence[str]],
                      path: str | Path, title: str, errors: dict[str, str] | None = None) -> Path:
    """One panel per entry of `panels` ({y label: [row keys]}), a group of bars per row, labelled by `label_keys`.

    `errors` maps a row key to the key of its error bar (e.g. a standard error).
    """
    errors = errors or {}
    labels = ["\n".join(str(r[k]) for k in label_keys) for r in rows]
    x = np.arange(len(rows))
    panel_width = min(7.0, max(4.0, 0.7 * len(rows) + 1.5))
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), 4.2), squeeze=False)
    for ax, (ylabel, keys) in zip(axes[0], panels.items(), strict=True):
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            err = [r[errors[key]] for r in rows] if key in errors else None
            ax.bar(x + (i - (len(keys) - 1) / 2) * width, [r.get(key, np.nan) for r in rows], width=width, yerr=err,
                   capsize=3, label=key)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(x, labels, fontsize=6 if len(rows) > 4 else 8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- 3. preference losses
PREFERENCE_LOSSES = {"dpo": dpo_loss, "cdpo": dpo_loss, "ipo": ipo_loss}  # cdpo = dpo_loss with label smoothing


def compare_preference_losses(cfg: EnhanceConfig) -> Comparison:
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
                          warmup_steps=min(2, cfg.pref_steps - 1), eval_interval=0,
                          label_smoothing=cfg.label_smoothing if variant == "cdpo" else 0.0, seed=cfg.seed)
        result = train_dpo(dcfg, loss=PREFERENCE_LOSSES[variant])
        final = result.trainer.eval_log.rows[-1]
        by_kind = rewards_by_kind(result.policy, result.val_data, dcfg.beta, dcfg.eval_batch_size)
        name = {"dpo": "DPO", "cdpo": f"cDPO (eps={cfg.label_smoothing})", "ipo": "IPO"}[variant]
        rows.append({
            "loss": name, "val reward acc": final["val_reward_acc"],
            **{f"acc {r['kind']}": r["reward_acc"] for r in by_kind if r["kind"] != "all"},
            "val margin": final["val_margin"],
            "chosen log-prob shift": final["val_chosen_logp"] - result.val_data.reference_chosen.mean().item(),
            "rejected log-prob shift": final["val_rejected_logp"] - result.val_data.reference_rejected.mean().item(),
            "s / step": _mean_after_first(result.trainer.train_log.column("step_time")[1]),
        })
        models[name] = result.policy
        del result
        gc.collect()
    return Comparison(rows, models=models)
