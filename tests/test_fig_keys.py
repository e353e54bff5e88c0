"""Part One's committed fig/*.json hold machine keys only (#28 item 4): snake_case, optionally namespaced with '/'
(`val_rewards/accuracies`, `eval/kl`); the headers people read come from `fm.metrics.DISPLAY_NAMES` when a table is
rendered. Part Two's files may key data by its value (a GAN weight `1e-3`, a notebook file name): not checked here."""

import json
import re
from pathlib import Path

import pytest

FIG = Path(__file__).resolve().parents[1] / "fig"
PART_ONE = ("dpo_metrics", "dpo_summary", "lm", "lm_enhance", "sft_metrics", "bench_train_step", "kv_cache_bench_gpt2",
            "theory_checks", "seeds_fm")
MACHINE_KEY = re.compile(r"[a-z0-9_]+(/[a-z0-9_]+)*")


def dict_keys(value: object) -> set[str]:
    """Every dict key anywhere in a JSON value."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in dict_keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in dict_keys(v)}
    return set()


def test_dict_keys_walks_nested_lists_and_dicts():
    assert dict_keys({"a": [{"b c": 1}, 2], "d": {"e": {"F": None}}}) == {"a", "b c", "d", "e", "F"}


@pytest.mark.parametrize("name", PART_ONE)
def test_part_one_fig_json_has_machine_keys_only(name):
    bad = sorted(k for k in dict_keys(json.loads((FIG / f"{name}.json").read_text())) if not MACHINE_KEY.fullmatch(k))
    assert not bad, f"fig/{name}.json has display strings as keys: {bad[:10]}"


def test_display_names_cover_the_rendered_columns():
    """Each machine key of a row that 1.4 renders as a table has a display name (a header stays readable)."""
    from fm.metrics import DISPLAY_NAMES

    numbers = json.loads((FIG / "lm_enhance.json").read_text())
    rows = [r for key in ("finetuning", "preference", "preference_seeds", "decoding") for r in numbers[key]]
    plain = {"method", "steps", "policy", "prompts", "reward", "loss", "beta", "seed", "seeds", "model", "decoding"}
    missing = sorted({k for r in rows for k in r} - plain - set(DISPLAY_NAMES))
    assert not missing, missing
