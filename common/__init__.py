"""Helpers shared by `fm` and `gm`: device, seeding, paths, profiles, configs, logging, plots, the training loop."""

from common.config import make_config
from common.device import autocast, get_device
from common.paths import cache_dir, checkpoint_dir, data_dir, fig_dir, repo_root
from common.profile import get_profile
from common.seed import seed_everything

__all__ = [
    "autocast",
    "cache_dir",
    "checkpoint_dir",
    "data_dir",
    "fig_dir",
    "get_device",
    "get_profile",
    "make_config",
    "repo_root",
    "seed_everything",
]
