"""GPT-2 on our own attention, with module names that load transformers' GPT-2 checkpoints.

The forward signature mirrors transformers' causal LMs, so one piece of calling code (generation, SFT, DPO) drives
both this `GPT` and any `AutoModelForCausalLM`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from common.config import check
from common.hub import hub_snapshot
from fm.attention import ATTN_IMPLS, MultiHeadSelfAttention
from fm.losses import causal_lm_loss

# A cache is one (K, V) pair per layer, each (B, h, past, d).
KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    attn_impl: str = "manual"  # "manual": the homework's attention (task 1.1); "sdpa": F.scaled_dot_product_attention

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            check(getattr(self, name) > 0, f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        check(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.attn_impl in ATTN_IMPLS, f"GPTConfig.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "small": dict(n_layer=4, n_head=4, n_embd=256, block_size=512),  # CPU experiments
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),  # tests and smoke runs
}


@dataclass
class CausalLMOutput:
    """What transformers' causal LMs return, reduced to the fields our code reads."""

    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's "gelu_new"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = MultiHeadSelfAttention(config.n_embd, config.n_head, config.block_size, config.dropout, config.bias,
                                           config.attn_impl)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attention_mask=None, layer_past=None, use_cache=False):
        a, present = self.attn(self.ln_1(x), attention_mask, layer_past, use_cache)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


def position_ids_from_mask(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Positions of the last T tokens counted over real tokens only, so left padding does not shift them.

    attention_mask: (B, past + T) -> (B, T). Padding positions get 0 (their outputs are never used).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for name in [n for n, _ in self.named_parameters() if n.endswith(self._CONV1D)]:
            # Stored (in, out) in memory, as transformers' Conv1D, while reading as nn.Linear's (out, in): F.linear then
            # runs the matmul on the untransposed matrix, which MKL does up to 1.4x faster on CPU (most at one token).
            linear = self.get_submodule(name.removesuffix(".weight"))
            linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t())

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """input_ids (B, T); attention_mask (B, past + T), 0 = padding; labels (B, T), -100 = ignored.

        The loss predicts labels[:, 1:] from positions [:, :-1] (transformers' convention), averaged over the labels
        that are not -100. `past_key_values` is what a previous call with `use_cache=True` returned.
        `logits_to_keep` = n > 0: logits (B, n, V) of the last n positions only (transformers' argument; sampling
        needs 1), 0: all T.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = past_key_values[0][0].shape[-2] if past_key_values else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence length {past + T} exceeds block_size {self.config.block_size}")
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be ({B}, past + T = {past + T}), got {list(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask, T)
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        presents = []
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, attention_mask, past_key_values[i] if past_key_values else None, use_cache)
            presents.append(present)
        if logits_to_keep < 0 or (logits_to_keep and labels is not None):
            raise ValueError(f"logits_to_keep must be >= 0 and 0 with labels (the loss needs every position), got "
                             f"{logits_to_keep}")
        logits = self.lm_head(self.transformer.ln_f(x[:, -logits_to_keep:] if logits_to_keep else x))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss, past_key_values=tuple(presents) if use_cache else None)

    # ---- transformers GPT-2 checkpoints ----------------------------------------------------------------------------
    _CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a transformers `GPT2LMHeadModel` (or `GPT2Model`) state dict; its Conv1D weights are (in, out)."""
        own = self.state_dict()
        loaded = set()
        with torch.no_grad():
            for key, value in state_dict.items():
                name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
                if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
                    continue
                if name not in own:
                    raise KeyError(f"unexpected key {key!r} in the GPT-2 state dict")
                if name.endswith(self._CONV1D):
                    value = value.t()
                if own[name].shape != value.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)}, model {tuple(own[name].shape)}")
                own[name].copy_(value)
                loaded.add(name)
        missing = set(own) - loaded - {"lm_head.weight"}  # lm_head is tied to wte
        if missing:
            raise KeyError(f"GPT-2 state dict lacks {sorted(missing)[:5]} ({len(missing)} keys)")

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in transformers' GPT-2 layout (Conv1D weights transposed, tied lm_head left out)."""
        return {
            k: (v.t() if k.endswith(self._CONV1D) else v).contiguous()
            for k, v in self.state_dict().items()
            if k != "lm_head.weight"
        }

    def hf_config(self) -> dict:
        c = self.config
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_embd": c.n_embd,
            "n_positions": c.block_size,
            "vocab_size": c.vocab_size,
            "layer_norm_epsilon": c.layer_norm_epsilon,
            "activation_function": "gelu_new",
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "tie_word_embeddings": True,
        }

    def save_pretrained(self, path: str | Path) -> None:
        """Write `config.json` + `model.safetensors` in transformers' GPT-2 layout (loads in both libraries)."""
        from safetensors.torch import save_file

        if not self.config.bias:
            raise ValueError("transformers' GPT-2 layout needs bias=True")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.hf_config(), indent=2))
        save_file({k: v.detach().cpu() for k, v in self.hf_state_dict().items()}, str(path / "model.safetensors"))

    @classmethod
    def config_from_hf(cls, hf: dict, attn_impl: str = "manual") -> GPTConfig:
        """Our config for a transformers GPT-2 config dict; `attn_impl` picks our attention path (see GPTConfig)."""
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"not a GPT-2 config (model_type={hf.get('model_type')!r}); use fm.pretrained.load_lm")
        unsupported = {
            "activation_function": ("gelu_new", hf.get("activation_function", "gelu_new")),
            "scale_attn_weights": (True, hf.get("scale_attn_weights", True)),
            "scale_attn_by_inverse_layer_idx": (False, hf.get("scale_attn_by_inverse_layer_idx", False)),
            "reorder_and_upcast_attn": (False, hf.get("reorder_and_upcast_attn", False)),
        }
        for key, (want, got) in unsupported.items():
            if want != got:
                raise ValueError(f"GPT-2 config option {key}={got!r} is not supported (only {want!r})")
        return GPTConfig(
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            attn_impl=attn_impl,
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, attn_impl: str = "manual") -> GPT:
        """Load a local directory written by `save_pretrained` (ours or transformers'), or a hub name like "gpt2".

        The hub is tried only when it answers (see `common.hub.hub_reachable`); otherwise a clear error.
        attn_impl: "manual" | "sdpa", our attention path (GPTConfig.attn_impl; not stored in the checkpoint).
        """
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            path = hub_snapshot(str(name_or_path), allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"],
                                hint="Use fm.pretrained.load_lm('smollm2-135m') offline, or a local directory.")
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{path} has no config.json; expected a save_pretrained directory")
        model = cls(cls.config_from_hf(json.loads(config_file.read_text()), attn_impl))
        model.load_hf_state_dict(_read_weights(path))
        return model.eval()


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has neither model.safetensors nor pytorch_model.bin")
