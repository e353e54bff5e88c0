"""Parameter counts of a module, and the digests of its weights and of a tensor."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalars in `module`'s parameters (only those with requires_grad if `trainable_only`).

    Tied weights count once, since `module.parameters()` yields each tensor once.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def weights_digest(module: nn.Module) -> str:
    """SHA-1 (40 hex digits) of a module's state dict: each name, then its tensor's bytes, in sorted name order.

    The identity of a model in run names and cache keys (the VAE an LDM and its latent cache belong to, the policy
    that sampled preference pairs). The bytes are read as uint8 so that any dtype hashes (numpy has no bfloat16);
    for float32 they equal `tensor.numpy().tobytes()`, the hash the LDM's keys were made with.
    """
    sha = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        sha.update(name.encode())
        sha.update(_bytes(tensor))
    return sha.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-1 (40 hex digits) of a tensor's shape, dtype and values: the identity of a batch in a cache key."""
    sha = hashlib.sha1(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
    sha.update(_bytes(tensor))
    return sha.hexdigest()


def _bytes(tensor: torch.Tensor) -> bytes:
    # read as uint8 so that any dtype hashes (numpy has no bfloat16)
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
