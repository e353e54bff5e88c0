"""Config dataclasses with per-profile presets and strict overrides.

Each task defines a dataclass and a dict `{profile: {field: value}}` of presets; `make_config` merges the
preset of the chosen profile with user overrides and rejects keys the dataclass does not have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, TypeVar

from common.profile import get_profile

C = TypeVar("C")


def make_config(cls: type[C], presets: dict[str, dict[str, Any]], profile: str | None = None, **overrides: Any) -> C:
    """Build `cls` from the preset of `profile` (default: $HW3_PROFILE or quick) updated with `overrides`."""
    profile = get_profile(profile)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {cls.__name__}; valid keys: {sorted(fields)}")
    if profile not in presets:
        raise ValueError(f"{cls.__name__} has no preset for profile {profile!r}; presets: {sorted(presets)}")
    return cls(**{**presets[profile], **overrides})


def check(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless `condition`: for the validation in configs' __post_init__."""
    if not condition:
        raise ValueError(message)


def json_digest(obj: Any, length: int) -> str:
    """First `length` hex digits of the SHA-1 of `obj` as sorted-key JSON (str() of what JSON cannot write): the key
    of a cache entry or run folder made from settings."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def config_digest(cfg: Any, exclude: set[str] | frozenset[str] = frozenset(), length: int = 8) -> str:
    """Short stable hash of a config dataclass's fields minus `exclude` (bookkeeping such as progress/device).

    Run folders are named with it, so changing any training-relevant setting starts a new run instead of
    silently reusing a stale one.
    """
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in exclude}
    return json_digest(fields, length)
