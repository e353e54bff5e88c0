"""Config dataclasses with per-profile presets and strict overrides, and the digest that names their runs.

Each task defines a dataclass and one preset table `{profile: {field: value, "by_dataset": {dataset: {field:
value}}}}`; `make_config` merges the chosen profile's preset, then its entry for the config's data set (if any), then
user overrides, and rejects keys the dataclass does not have.

A run's folder is named by `config_digest`, a hash of the fields that change the trained weights. A field that does
not (where the run executes, how often it logs or evaluates, how a finished model is sampled) is declared with
`bookkeeping(default)`: the mark lives in the field's metadata, once, and every digest reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, TypeVar

from common.profile import get_profile

C = TypeVar("C")


def make_config(cls: type[C], presets: dict[str, dict[str, Any]], profile: str | None = None, **overrides: Any) -> C:
    """Build `cls` from the preset of `profile` (default: $HW3_PROFILE or quick), updated with the preset's
    "by_dataset" entry for the data set (`overrides["dataset"]`, else the preset's or the field's default), then with
    `overrides`."""
    profile = get_profile(profile)
    fields = {f.name for f in dataclasses.fields(cls)}
    if profile not in presets:
        raise ValueError(f"{cls.__name__} has no preset for profile {profile!r}; presets: {sorted(presets)}")
    preset = dict(presets[profile])
    by_dataset = preset.pop("by_dataset", {})
    dataset = overrides.get("dataset", preset.get("dataset", getattr(cls, "dataset", None)))
    values = {**preset, **by_dataset.get(dataset, {}), **overrides}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {cls.__name__}; valid keys: {sorted(fields)}")
    return cls(**values)


def check(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless `condition`: for the validation in configs' __post_init__."""
    if not condition:
        raise ValueError(message)


def json_digest(obj: Any, length: int) -> str:
    """First `length` hex digits of the SHA-1 of `obj` as sorted-key JSON (str() of what JSON cannot write): the key
    of a cache entry or run folder made from settings."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def bookkeeping(default: Any) -> Any:
    """A config field that does not change the trained weights: `config_digest`, and so the run's folder name,
    leaves it out (use as `device: str | None = bookkeeping(None)`)."""
    return dataclasses.field(default=default, metadata={"bookkeeping": True})


def added_field(default: Any) -> Any:
    """A training field added after runs were saved: `config_digest` leaves it out while it holds `default`, so that
    the runs from before the field existed keep their folders; any other value is hashed like every field."""
    return dataclasses.field(default=default, metadata={"digest_omits": default})


@dataclasses.dataclass
class RunConfig:
    """The fields of an image run's config (VAE, classifier, LDM) beyond its training settings: the seed and profile
    (hashed), and where and how verbosely it runs (bookkeeping). A subclass's fields follow these; it may redeclare
    one with another default."""

    seed: int = 0
    device: str | None = bookkeeping(None)  # None: common.get_device()
    log_interval: int = bookkeeping(1)  # train metrics are read off the device (a host sync) every log_interval steps
    profile: str = "quick"
    progress: bool = bookkeeping(True)  # a progress bar


def digest_fields(cfg: Any) -> dict[str, Any]:
    """The fields of config dataclass `cfg` that its digest hashes: all but the `bookkeeping` ones (and an
    `added_field` at its default)."""
    values = dataclasses.asdict(cfg)
    omitted = object()  # never equal to a value
    return {f.name: values[f.name] for f in dataclasses.fields(cfg)
            if not f.metadata.get("bookkeeping") and values[f.name] != f.metadata.get("digest_omits", omitted)}


def config_digest(cfg: Any, length: int = 8) -> str:
    """Short stable hash of a config dataclass's `digest_fields`.

    Run folders are named with it, so changing any training-relevant setting starts a new run instead of
    silently reusing a stale one.
    """
    return json_digest(digest_fields(cfg), length)
