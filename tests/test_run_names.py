"""Run folder names, and the weights digest in cache keys, stay identical across refactors (#28 item 3).

EXPECTED was computed by the code of commit 652bf38 (before the bookkeeping fields were marked in the dataclasses'
metadata): every preset of every profile and data set, the 1.4 and 2.4 experiment runs built from them, and the
2.2 GAN grid. A changed name would silently retrain a run, or orphan its checkpoint. The quick GAN runs' names changed
on purpose when their adversarial phase went from 200 to 300 steps (#32 item 2) and then to 250 (#32 item 6: 2_2
within 15 minutes), the CIFAR-10 judge's when it went from 7 to 5 epochs (#32 item 6), and the 1.3 DPO, 1.4
LoRA-vs-full and 1.4 frontier runs when their presets changed (#31: LoRA DPO of 40 steps; a frontier of beta x
training seed, named by `fm.comparisons.preference_run_config`; #32 item 6: quick frontier runs of 8 steps and 16
validation pairs, not 12 and 32).
Unchanged configs of those families kept their digests.
"""

from __future__ import annotations

import torch
from torch import nn

PROFILES = ("smoke", "quick", "full")
DATASETS = ("mnist", "cifar10")
VAE_DIGEST = "0123456789abcdef0123456789abcdef01234567"  # a stand-in for the SHA-1 of a VAE's weights


def current_names() -> dict[str, str]:
    """Every run folder name (and digest in a cache key) of today's presets, by a readable key."""
    import dataclasses

    from fm.comparisons import lm_enhance_config, preference_run_config
    from fm.dpo import dpo_config, dpo_dir
    from fm.sft import sft_config, sft_dir
    from gm.enhance import VARIANTS
    from gm.eval import classifier_config
    from gm.ldm import ldm_config
    from gm.vae import base_config, gan_config, vae_config

    names = {}
    for profile in PROFILES:
        names[f"sft/{profile}"] = sft_dir(sft_config(profile)).name
        names[f"dpo/{profile}"] = dpo_dir(dpo_config(profile)).name
        enhance = lm_enhance_config(profile)
        for rank, lr in ((0, enhance.full_lr), (enhance.lora_rank, enhance.lora_lr)):
            cfg = sft_config(profile, run_name=f"enhance_{'lora' if rank else 'full'}_{profile}",
                             steps=enhance.ft_steps, warmup_steps=min(2, enhance.ft_steps - 1), lr=lr, lora_rank=rank,
                             lora_alpha=enhance.lora_alpha, eval_examples=enhance.ft_eval_examples, eval_interval=0,
                             seed=enhance.seed)
            names[f"sft/enhance/{profile}/rank{rank}"] = sft_dir(cfg).name
        for loss, beta in enhance.variants:
            for seed in enhance.seeds:
                cfg = preference_run_config(enhance, loss, beta, seed)
                names[f"dpo/enhance/{profile}/{loss}_{beta:g}_seed{seed}"] = dpo_dir(cfg).name
        for dataset in DATASETS:
            key = f"{profile}/{dataset}"
            names[f"vae/{key}"] = vae_config(dataset, profile).run_name()
            names[f"vae/{key}/ldm"] = vae_config(dataset, profile, kl_weight=1e-6).run_name()
            for kl_weight in (1e-6, 1e-3):
                for gan_weight in (0.0, 0.1):
                    for mode in ("fixed", "adaptive"):
                        cfg = gan_config(kl_weight, gan_weight, profile, dataset, gan_mode=mode)
                        names[f"gan/{key}/kl{kl_weight:g}_gan{gan_weight:g}_{mode}"] = cfg.run_name()
                names[f"gan/{key}/kl{kl_weight:g}/base"] = base_config(gan_config(kl_weight, 0.1, profile,
                                                                                  dataset)).run_name()
            names[f"classifier/{key}"] = classifier_config(dataset, profile).run_name()
            ldm = ldm_config(dataset, profile)
            names[f"ldm/{key}"] = ldm.run_name(VAE_DIGEST)
            names[f"ldm/{key}/flow"] = dataclasses.replace(ldm, process="flow").run_name(VAE_DIGEST)
            for variant, overrides in VARIANTS.items():
                names[f"ldm/{key}/{variant}"] = dataclasses.replace(ldm, **overrides).run_name(VAE_DIGEST)
    return names


EXPECTED = {
    "sft/smoke": "smoke_a7f380d3",
    "dpo/smoke": "smoke_2976bdc4_sft-a7f380d3",
    "sft/enhance/smoke/rank0": "enhance_full_smoke_10c8d5df",
    "sft/enhance/smoke/rank4": "enhance_lora_smoke_3a9a6c20",
    "dpo/enhance/smoke/dpo_0.1_seed0": "smoke_2976bdc4_sft-a7f380d3",
    "dpo/enhance/smoke/dpo_0.1_seed1": "smoke_8daf2ebb_sft-a7f380d3",
    "dpo/enhance/smoke/cdpo_0.1_seed0": "smoke_07bb9c1a_sft-a7f380d3",
    "dpo/enhance/smoke/cdpo_0.1_seed1": "smoke_f0503657_sft-a7f380d3",
    "dpo/enhance/smoke/ipo_0.1_seed0": "smoke_3138b82f_sft-a7f380d3",
    "dpo/enhance/smoke/ipo_0.1_seed1": "smoke_107ac6ce_sft-a7f380d3",
    "vae/smoke/mnist": "mnist_kl0.001_gan0_smoke_c17ad337",
    "vae/smoke/mnist/ldm": "mnist_kl1e-06_gan0_smoke_9d98aebc",
    "gan/smoke/mnist/kl1e-06_gan0_fixed": "mnist_kl1e-06_gan0_smoke_35421c9b",
    "gan/smoke/mnist/kl1e-06_gan0_adaptive": "mnist_kl1e-06_gan0_smoke_6a3d0b1b",
    "gan/smoke/mnist/kl1e-06_gan0.1_fixed": "mnist_kl1e-06_gan0.1_smoke_197dbc49",
    "gan/smoke/mnist/kl1e-06_gan0.1_adaptive": "mnist_kl1e-06_gan0.1_smoke_995c2d78",
    "gan/smoke/mnist/kl1e-06/base": "mnist_kl1e-06_gan0_smoke_9d98aebc",
    "gan/smoke/mnist/kl0.001_gan0_fixed": "mnist_kl0.001_gan0_smoke_77430b7f",
    "gan/smoke/mnist/kl0.001_gan0_adaptive": "mnist_kl0.001_gan0_smoke_04844d21",
    "gan/smoke/mnist/kl0.001_gan0.1_fixed": "mnist_kl0.001_gan0.1_smoke_12120181",
    "gan/smoke/mnist/kl0.001_gan0.1_adaptive": "mnist_kl0.001_gan0.1_smoke_8365a73c",
    "gan/smoke/mnist/kl0.001/base": "mnist_kl0.001_gan0_smoke_c17ad337",
    "classifier/smoke/mnist": "mnist_smoke_a3d732b7",
    "ldm/smoke/mnist": "mnist_smoke_3aac1bc0_vae01234567",
    "ldm/smoke/mnist/flow": "mnist_smoke_63607108_vae01234567",
    "ldm/smoke/mnist/cosine schedule": "mnist_smoke_3d962ce6_vae01234567",
    "ldm/smoke/mnist/v-prediction": "mnist_smoke_8f82814e_vae01234567",
    "ldm/smoke/mnist/cosine + v-prediction": "mnist_smoke_021de6fb_vae01234567",
    "vae/smoke/cifar10": "cifar10_kl0.001_gan0_smoke_8194461f",
    "vae/smoke/cifar10/ldm": "cifar10_kl1e-06_gan0_smoke_3724e363",
    "gan/smoke/cifar10/kl1e-06_gan0_fixed": "cifar10_kl1e-06_gan0_smoke_ce93aa2d",
    "gan/smoke/cifar10/kl1e-06_gan0_adaptive": "cifar10_kl1e-06_gan0_smoke_ef836fd4",
    "gan/smoke/cifar10/kl1e-06_gan0.1_fixed": "cifar10_kl1e-06_gan0.1_smoke_49b7cdcb",
    "gan/smoke/cifar10/kl1e-06_gan0.1_adaptive": "cifar10_kl1e-06_gan0.1_smoke_3db66b6a",
    "gan/smoke/cifar10/kl1e-06/base": "cifar10_kl1e-06_gan0_smoke_3724e363",
    "gan/smoke/cifar10/kl0.001_gan0_fixed": "cifar10_kl0.001_gan0_smoke_5ca0dbab",
    "gan/smoke/cifar10/kl0.001_gan0_adaptive": "cifar10_kl0.001_gan0_smoke_7ec533c7",
    "gan/smoke/cifar10/kl0.001_gan0.1_fixed": "cifar10_kl0.001_gan0.1_smoke_9add2111",
    "gan/smoke/cifar10/kl0.001_gan0.1_adaptive": "cifar10_kl0.001_gan0.1_smoke_2100d593",
    "gan/smoke/cifar10/kl0.001/base": "cifar10_kl0.001_gan0_smoke_8194461f",
    "classifier/smoke/cifar10": "cifar10_smoke_2322205b",
    "ldm/smoke/cifar10": "cifar10_smoke_72f61b33_vae01234567",
    "ldm/smoke/cifar10/flow": "cifar10_smoke_64e58a66_vae01234567",
    "ldm/smoke/cifar10/cosine schedule": "cifar10_smoke_d24f1218_vae01234567",
    "ldm/smoke/cifar10/v-prediction": "cifar10_smoke_5395321e_vae01234567",
    "ldm/smoke/cifar10/cosine + v-prediction": "cifar10_smoke_0cd582b2_vae01234567",
    "sft/quick": "quick_39656d4f",
    "dpo/quick": "quick_0985fff1_sft-39656d4f",
    "sft/enhance/quick/rank0": "enhance_full_quick_bebbd7ec",
    "sft/enhance/quick/rank16": "enhance_lora_quick_f8792a3a",
    "dpo/enhance/quick/dpo_0.05_seed0": "frontier_quick_0b9c41dd_sft-39656d4f",
    "dpo/enhance/quick/dpo_0.05_seed1": "frontier_quick_e8ca546d_sft-39656d4f",
    "dpo/enhance/quick/dpo_0.1_seed0": "frontier_quick_3d9babc8_sft-39656d4f",
    "dpo/enhance/quick/dpo_0.1_seed1": "frontier_quick_48fa09ba_sft-39656d4f",
    "dpo/enhance/quick/dpo_0.5_seed0": "frontier_quick_cc9b7b0c_sft-39656d4f",
    "dpo/enhance/quick/dpo_0.5_seed1": "frontier_quick_ae9f1c7b_sft-39656d4f",
    "dpo/enhance/quick/dpo_2_seed0": "frontier_quick_1320c24f_sft-39656d4f",
    "dpo/enhance/quick/dpo_2_seed1": "frontier_quick_3dfed86d_sft-39656d4f",
    "vae/quick/mnist": "mnist_kl0.001_gan0_quick_f7f6dee8",
    "vae/quick/mnist/ldm": "mnist_kl1e-06_gan0_quick_8db3c72e",
    "gan/quick/mnist/kl1e-06_gan0_fixed": "mnist_kl1e-06_gan0_quick_4ed71fe7",
    "gan/quick/mnist/kl1e-06_gan0_adaptive": "mnist_kl1e-06_gan0_quick_955bf334",
    "gan/quick/mnist/kl1e-06_gan0.1_fixed": "mnist_kl1e-06_gan0.1_quick_1f845c41",
    "gan/quick/mnist/kl1e-06_gan0.1_adaptive": "mnist_kl1e-06_gan0.1_quick_bab3c6d2",
    "gan/quick/mnist/kl1e-06/base": "mnist_kl1e-06_gan0_quick_8db3c72e",
    "gan/quick/mnist/kl0.001_gan0_fixed": "mnist_kl0.001_gan0_quick_12392ad6",
    "gan/quick/mnist/kl0.001_gan0_adaptive": "mnist_kl0.001_gan0_quick_b1668092",
    "gan/quick/mnist/kl0.001_gan0.1_fixed": "mnist_kl0.001_gan0.1_quick_a51a1f8f",
    "gan/quick/mnist/kl0.001_gan0.1_adaptive": "mnist_kl0.001_gan0.1_quick_2363db74",
    "gan/quick/mnist/kl0.001/base": "mnist_kl0.001_gan0_quick_f7f6dee8",
    "classifier/quick/mnist": "mnist_quick_ca484cd2",
    "ldm/quick/mnist": "mnist_quick_054510cb_vae01234567",
    "ldm/quick/mnist/flow": "mnist_quick_7a60eaa9_vae01234567",
    "ldm/quick/mnist/cosine schedule": "mnist_quick_0ab83321_vae01234567",
    "ldm/quick/mnist/v-prediction": "mnist_quick_f12fe0ee_vae01234567",
    "ldm/quick/mnist/cosine + v-prediction": "mnist_quick_8a79e9f7_vae01234567",
    "vae/quick/cifar10": "cifar10_kl0.001_gan0_quick_c669eb88",
    "vae/quick/cifar10/ldm": "cifar10_kl1e-06_gan0_quick_be7a6583",
    "gan/quick/cifar10/kl1e-06_gan0_fixed": "cifar10_kl1e-06_gan0_quick_af705403",
    "gan/quick/cifar10/kl1e-06_gan0_adaptive": "cifar10_kl1e-06_gan0_quick_ec304cad",
    "gan/quick/cifar10/kl1e-06_gan0.1_fixed": "cifar10_kl1e-06_gan0.1_quick_1c320b23",
    "gan/quick/cifar10/kl1e-06_gan0.1_adaptive": "cifar10_kl1e-06_gan0.1_quick_e93764a6",
    "gan/quick/cifar10/kl1e-06/base": "cifar10_kl1e-06_gan0_quick_be7a6583",
    "gan/quick/cifar10/kl0.001_gan0_fixed": "cifar10_kl0.001_gan0_quick_b1aff615",
    "gan/quick/cifar10/kl0.001_gan0_adaptive": "cifar10_kl0.001_gan0_quick_4aed26c1",
    "gan/quick/cifar10/kl0.001_gan0.1_fixed": "cifar10_kl0.001_gan0.1_quick_dcb98fa3",
    "gan/quick/cifar10/kl0.001_gan0.1_adaptive": "cifar10_kl0.001_gan0.1_quick_2772b6c8",
    "gan/quick/cifar10/kl0.001/base": "cifar10_kl0.001_gan0_quick_c669eb88",
    "classifier/quick/cifar10": "cifar10_quick_8cab148d",
    "ldm/quick/cifar10": "cifar10_quick_4a8ad5a2_vae01234567",
    "ldm/quick/cifar10/flow": "cifar10_quick_49a2d2e1_vae01234567",
    "ldm/quick/cifar10/cosine schedule": "cifar10_quick_8ace0d5e_vae01234567",
    "ldm/quick/cifar10/v-prediction": "cifar10_quick_123eea7d_vae01234567",
    "ldm/quick/cifar10/cosine + v-prediction": "cifar10_quick_08bf8165_vae01234567",
    "sft/full": "full_1cce4f4f",
    "dpo/full": "full_7b356c30_sft-1cce4f4f",
    "sft/enhance/full/rank0": "enhance_full_full_81045d1b",
    "sft/enhance/full/rank16": "enhance_lora_full_578ba354",
    "dpo/enhance/full/dpo_0.05_seed0": "full_cc6e59ba_sft-1cce4f4f",
    "dpo/enhance/full/dpo_0.05_seed1": "full_82d8c84d_sft-1cce4f4f",
    "dpo/enhance/full/dpo_0.05_seed2": "full_1d8c9111_sft-1cce4f4f",
    "dpo/enhance/full/dpo_0.1_seed0": "full_7b356c30_sft-1cce4f4f",
    "dpo/enhance/full/dpo_0.1_seed1": "full_daa4bb93_sft-1cce4f4f",
    "dpo/enhance/full/dpo_0.1_seed2": "full_40ba6561_sft-1cce4f4f",
    "dpo/enhance/full/dpo_0.5_seed0": "full_2f2a4ce0_sft-1cce4f4f",
    "dpo/enhance/full/dpo_0.5_seed1": "full_a3d0313f_sft-1cce4f4f",
    "dpo/enhance/full/dpo_0.5_seed2": "full_1613293d_sft-1cce4f4f",
    "dpo/enhance/full/dpo_2_seed0": "full_7aeb9a4e_sft-1cce4f4f",
    "dpo/enhance/full/dpo_2_seed1": "full_9008f161_sft-1cce4f4f",
    "dpo/enhance/full/dpo_2_seed2": "full_f125e8ba_sft-1cce4f4f",
    "dpo/enhance/full/dpo_5_seed0": "full_e902b2e5_sft-1cce4f4f",
    "dpo/enhance/full/dpo_5_seed1": "full_1d812894_sft-1cce4f4f",
    "dpo/enhance/full/dpo_5_seed2": "full_11bddbbf_sft-1cce4f4f",
    "dpo/enhance/full/cdpo_0.1_seed0": "full_68ec5579_sft-1cce4f4f",
    "dpo/enhance/full/cdpo_0.1_seed1": "full_9d22f048_sft-1cce4f4f",
    "dpo/enhance/full/cdpo_0.1_seed2": "full_16f36e64_sft-1cce4f4f",
    "dpo/enhance/full/ipo_0.1_seed0": "full_b8adb18e_sft-1cce4f4f",
    "dpo/enhance/full/ipo_0.1_seed1": "full_12e37628_sft-1cce4f4f",
    "dpo/enhance/full/ipo_0.1_seed2": "full_5cc02972_sft-1cce4f4f",
    "dpo/enhance/full/ipo_0.5_seed0": "full_cb710e7b_sft-1cce4f4f",
    "dpo/enhance/full/ipo_0.5_seed1": "full_895767bb_sft-1cce4f4f",
    "dpo/enhance/full/ipo_0.5_seed2": "full_eebf8093_sft-1cce4f4f",
    "vae/full/mnist": "mnist_kl0.001_gan0_full_cfe02ba5",
    "vae/full/mnist/ldm": "mnist_kl1e-06_gan0_full_cc7485ca",
    "gan/full/mnist/kl1e-06_gan0_fixed": "mnist_kl1e-06_gan0_full_308a951a",
    "gan/full/mnist/kl1e-06_gan0_adaptive": "mnist_kl1e-06_gan0_full_5fbce198",
    "gan/full/mnist/kl1e-06_gan0.1_fixed": "mnist_kl1e-06_gan0.1_full_45ad92a4",
    "gan/full/mnist/kl1e-06_gan0.1_adaptive": "mnist_kl1e-06_gan0.1_full_3ceb4b71",
    "gan/full/mnist/kl1e-06/base": "mnist_kl1e-06_gan0_full_cc7485ca",
    "gan/full/mnist/kl0.001_gan0_fixed": "mnist_kl0.001_gan0_full_0d237026",
    "gan/full/mnist/kl0.001_gan0_adaptive": "mnist_kl0.001_gan0_full_c6d49744",
    "gan/full/mnist/kl0.001_gan0.1_fixed": "mnist_kl0.001_gan0.1_full_d7889cf1",
    "gan/full/mnist/kl0.001_gan0.1_adaptive": "mnist_kl0.001_gan0.1_full_58d6a332",
    "gan/full/mnist/kl0.001/base": "mnist_kl0.001_gan0_full_cfe02ba5",
    "classifier/full/mnist": "mnist_full_341c3a81",
    "ldm/full/mnist": "mnist_full_f0579cc1_vae01234567",
    "ldm/full/mnist/flow": "mnist_full_6bbb0656_vae01234567",
    "ldm/full/mnist/cosine schedule": "mnist_full_2057ef68_vae01234567",
    "ldm/full/mnist/v-prediction": "mnist_full_e5c110fe_vae01234567",
    "ldm/full/mnist/cosine + v-prediction": "mnist_full_eaa89125_vae01234567",
    "vae/full/cifar10": "cifar10_kl0.001_gan0_full_884617cd",
    "vae/full/cifar10/ldm": "cifar10_kl1e-06_gan0_full_f0329a38",
    "gan/full/cifar10/kl1e-06_gan0_fixed": "cifar10_kl1e-06_gan0_full_f81bf882",
    "gan/full/cifar10/kl1e-06_gan0_adaptive": "cifar10_kl1e-06_gan0_full_3f398188",
    "gan/full/cifar10/kl1e-06_gan0.1_fixed": "cifar10_kl1e-06_gan0.1_full_a6b94b75",
    "gan/full/cifar10/kl1e-06_gan0.1_adaptive": "cifar10_kl1e-06_gan0.1_full_f5b29517",
    "gan/full/cifar10/kl1e-06/base": "cifar10_kl1e-06_gan0_full_f0329a38",
    "gan/full/cifar10/kl0.001_gan0_fixed": "cifar10_kl0.001_gan0_full_f1941012",
    "gan/full/cifar10/kl0.001_gan0_adaptive": "cifar10_kl0.001_gan0_full_67bcaea6",
    "gan/full/cifar10/kl0.001_gan0.1_fixed": "cifar10_kl0.001_gan0.1_full_5bb35665",
    "gan/full/cifar10/kl0.001_gan0.1_adaptive": "cifar10_kl0.001_gan0.1_full_86064355",
    "gan/full/cifar10/kl0.001/base": "cifar10_kl0.001_gan0_full_884617cd",
    "classifier/full/cifar10": "cifar10_full_c151118f",
    "ldm/full/cifar10": "cifar10_full_512e3b0e_vae01234567",
    "ldm/full/cifar10/flow": "cifar10_full_affe9d59_vae01234567",
    "ldm/full/cifar10/cosine schedule": "cifar10_full_6835f7e3_vae01234567",
    "ldm/full/cifar10/v-prediction": "cifar10_full_ef4a096d_vae01234567",
    "ldm/full/cifar10/cosine + v-prediction": "cifar10_full_f6b83e0f_vae01234567",
}


def test_run_folder_names_are_unchanged():
    names = current_names()
    changed = {key: (EXPECTED.get(key), name) for key, name in names.items() if EXPECTED.get(key) != name}
    assert not changed, f"run folder names changed (expected, now): {changed}"
    assert set(names) == set(EXPECTED)


def test_weights_digest_keeps_the_latent_cache_and_ldm_keys():
    """The LDM's run name and latent cache embed the VAE's weights digest (SHA-1 over sorted names and bytes)."""
    from common.params import weights_digest

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    assert weights_digest(module) == "91002f95887bad39ee624420564d151f1972cf1b"
    module[0].bias.data[0] += 1e-6
    assert weights_digest(module) != "91002f95887bad39ee624420564d151f1972cf1b"
    assert len(weights_digest(module.to(torch.bfloat16))) == 40  # bf16 weights hash too (numpy has no bfloat16)
