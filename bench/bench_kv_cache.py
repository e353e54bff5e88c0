"""Tokens/s of `fm.generate.generate` with and without the KV cache on the GPT-2 (124M) architecture, measured by
`fm.generate.kv_cache_benchmark` (the one benchmark of the package; notebook 1.0 times the loaded LM with it).

Random weights are enough: the cost of a forward pass does not depend on the weights. Both runs decode greedily, so
they must return the same tokens, which the script checks.

    .venv/bin/python bench/bench_kv_cache.py [--preset gpt2] [--new-tokens 8 200] [--repeats 5] [--prompt-len 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import fig_dir, get_device  # noqa: E402
from common.plotting import markdown_table  # noqa: E402
from fm.generate import kv_cache_benchmark  # noqa: E402
from fm.metrics import DISPLAY_NAMES  # noqa: E402
from fm.model import GPT, GPTConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description="KV-cache generation benchmark")
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[200])
    parser.add_argument("--repeats", type=int, default=5, help="timings per length (median and min/max reported)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")
    parser.add_argument("--out", default=None, help="JSON file (default: <fig dir>/kv_cache_bench_<preset>.json)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset)).to(device).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), device=device)
    rows = kv_cache_benchmark(model, prompt, args.new_tokens, repeats=args.repeats, progress=True)
    if not all(row["same_tokens"] for row in rows):
        raise AssertionError("cached and uncached greedy generations differ")
    result = dict(rows=rows, preset=args.preset, parameters_m=round(model.num_parameters() / 1e6, 1),
                  prompt_len=args.prompt_len, device=str(device), threads=torch.get_num_threads())
    print(markdown_table(rows, names=DISPLAY_NAMES))
    setting = f"{args.preset}, {result['parameters_m']}M params, prompt {args.prompt_len}, {args.repeats} repeats"
    speedups = ", ".join(f"{r['speedup']:.2f}x at {r['new_tokens']}" for r in rows)
    print(f"KV-cache speed-up (median): {speedups} ({setting}, {result['threads']} CPU threads)")
    out = args.out or fig_dir() / f"kv_cache_bench_{args.preset}.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
