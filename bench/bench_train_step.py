"""Training-step and generation speed of our GPT against transformers' GPT-2, same weights, on one machine.

- forward + backward (loss on labels = input ids) of the gpt2 config with 6 layers (width 768) at batch 4 x 256 and
  2 x 512: ours with the manual attention, ours with SDPA, and `GPT2LMHeadModel` with attn_implementation="sdpa";
- cached greedy generation, tokens/s: `fm.generate.generate` on ours against HF `generate`.

Runs are interleaved (rounds of ours-manual, ours-sdpa, HF, repeated), so a noisy machine slows all three alike;
the script prints median times and the ratios ours / HF (< 1: ours is faster; for generation, > 1: ours is faster).

    .venv/bin/python bench/bench_train_step.py [--repeats 10] [--threads 1] [--new-tokens 100] [--out result.json]
    .venv/bin/python bench/bench_train_step.py --quick   # a tiny model and a few repeats: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, replace

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.device import timed  # noqa: E402
from common.plotting import markdown_table  # noqa: E402
from fm.generate import generate  # noqa: E402
from fm.model import GPT, GPTConfig  # noqa: E402

FULL = dict(config=dict(n_layer=6), shapes=((4, 256), (2, 512)), repeats=10, new_tokens=100, prompt_len=16)
QUICK = dict(config=dict(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=1000), shapes=((2, 32), (1, 64)),
             repeats=2, new_tokens=8, prompt_len=8)
MODEL_NAMES = {"ours_manual": "ours manual", "ours_sdpa": "ours sdpa", "hf_sdpa": "HF sdpa"}
DISPLAY_NAMES = {"forward_backward": "forward + backward", "greedy_generation": "greedy generation",
                 "same_tokens": "same tokens", **{f"{k}_s": f"{n} (s)" for k, n in MODEL_NAMES.items()},
                 **{f"{k}_tokens_per_s": f"{n} (tokens/s)" for k, n in MODEL_NAMES.items()},
                 **{f"{k}_vs_hf": f"{n} / HF" for k, n in MODEL_NAMES.items()}}  # the printed tables' headers


def build_models(config: GPTConfig) -> dict[str, nn.Module]:
    """Ours (manual), ours (SDPA) and transformers' GPT2LMHeadModel (SDPA), all with the same random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    manual = GPT(config)
    hf_config = {**manual.hf_config(), "bos_token_id": None, "eos_token_id": None}  # random weights: no EOS stops
    hf = GPT2LMHeadModel(GPT2Config(**hf_config, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(manual.hf_state_dict(), strict=False)
    if unexpected or set(missing) != {"lm_head.weight"}:  # lm_head is tied to wte
        raise RuntimeError(f"HF GPT-2 did not take our weights: missing {missing}, unexpected {unexpected}")
    sdpa = GPT(replace(config, attn_impl="sdpa"))
    sdpa.load_hf_state_dict(hf.state_dict())
    models = {"ours_manual": manual, "ours_sdpa": sdpa, "hf_sdpa": hf}
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        want = hf.eval()(ids).logits
        for name in ("ours_manual", "ours_sdpa"):
            torch.testing.assert_close(models[name].eval()(ids).logits, want, atol=1e-4, rtol=1e-4, msg=name)
    return models


def interleaved_medians(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each case over `repeats` rounds; each round runs every case once, after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(repeats + 1):
        for name, case in cases.items():
            _, seconds = timed(case)
            if round_:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(model: nn.Module, ids: torch.Tensor) -> None:
    """One forward + backward, as a training step computes them (the optimizer update is the same for both)."""
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()


def bench_train(models: dict[str, nn.Module], shapes, vocab_size: int, repeats: int) -> list[dict]:
    rows = []
    for batch, length in shapes:
        ids = torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(batch))
        for model in models.values():
            model.train()
        cases = {name: (lambda m=model, x=ids: train_step(m, x)) for name, model in models.items()}
        med = interleaved_medians(cases, repeats)
        row = {"forward_backward": f"{batch} x {length}", **{f"{n}_s": round(t, 4) for n, t in med.items()}}
        row.update({f"{n}_vs_hf": round(med[n] / med["hf_sdpa"], 3) for n in ("ours_manual", "ours_sdpa")})
        rows.append(row)
        print(markdown_table([row], names=DISPLAY_NAMES), flush=True)
    return rows


def bench_generate(models: dict[str, nn.Module], vocab_size: int, prompt_len: int, new_tokens: int,
                   repeats: int) -> dict:
    prompt = torch.randint(0, vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    outputs: dict[str, torch.Tensor] = {}

    def ours(name: str) -> None:
        outputs[name] = generate(models[name], prompt, new_tokens, temperature=0.0, attention_mask=mask)

    def hf() -> None:
        outputs["hf_sdpa"] = models["hf_sdpa"].generate(
            prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            use_cache=True, pad_token_id=0,
        )

    for model in models.values():
        model.eval()
    with torch.no_grad():
        med = interleaved_medians({"ours_manual": lambda: ours("ours_manual"), "ours_sdpa": lambda: ours("ours_sdpa"),
                                   "hf_sdpa": hf}, repeats)
    tokens_per_s = {name: new_tokens / t for name, t in med.items()}
    row = {"greedy_generation": f"1 x {prompt_len} + {new_tokens}",
           **{f"{n}_tokens_per_s": round(v, 1) for n, v in tokens_per_s.items()}}
    row.update({f"{n}_vs_hf": round(tokens_per_s[n] / tokens_per_s["hf_sdpa"], 3)
                for n in ("ours_manual", "ours_sdpa")})
    row["same_tokens"] = all(torch.equal(out, outputs["hf_sdpa"]) for out in outputs.values())
    print(markdown_table([row], names=DISPLAY_NAMES), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description="forward + backward and generation: our GPT vs transformers' GPT-2")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 10; quick: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 100; quick: 8)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, small shapes, 2 repeats")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    setting = QUICK if args.quick else FULL
    repeats = args.repeats or setting["repeats"]
    new_tokens = args.new_tokens or setting["new_tokens"]
    if repeats < 1 or new_tokens < 1:
        raise SystemExit(f"--repeats and --new-tokens must be >= 1, got {repeats} and {new_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)

    config = GPTConfig.from_preset("gpt2", **setting["config"])
    models = build_models(config)
    print(f"GPT-2 config, {config.n_layer} layers, width {config.n_embd}: "
          f"{models['ours_manual'].num_parameters() / 1e6:.1f}M parameters; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {repeats} interleaved rounds", flush=True)
    result = {
        "config": asdict(config), "threads": torch.get_num_threads(), "repeats": repeats,
        "train": bench_train(models, setting["shapes"], config.vocab_size, repeats),
        "generate": bench_generate(models, config.vocab_size, setting["prompt_len"], new_tokens, repeats),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
