"""Run profiles: `quick` (default, CPU minutes), `full` (the homework's settings, GPU), `smoke` (a few steps, CI)."""

import os

PROFILES = ("smoke", "quick", "full")


def get_profile(profile: str | None = None) -> str:
    """`profile` if given, else $HW3_PROFILE, else "quick"."""
    name = profile or os.environ.get("HW3_PROFILE") or "quick"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)} (set HW3_PROFILE)")
    return name
