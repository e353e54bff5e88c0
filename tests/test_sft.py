"""SFT training: the loss, that a few steps fit a fixed batch, bit-exact resume, LoRA, config errors."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fm.data import IGNORE_INDEX
from fm.lora import LoRALinear
from fm.sft import build_sft, causal_lm_loss, sft_config, sft_loss
from fm.tokenizer import get_gpt2_tokenizer


def _tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64))


def _cfg(**overrides):
    base = dict(run_name="test", data_source="chitchat", block_size=48, train_examples=16, eval_examples=4,
                batch_size=4, steps=4, lr=1e-3, warmup_steps=1, eval_interval=2, device="cpu")
    return sft_config("smoke", **{**base, **overrides})


def _build(seed: int = 0, **overrides):
    return build_sft(_cfg(**overrides), _tiny_model(seed), get_gpt2_tokenizer())


def test_causal_lm_loss_shifts_like_transformers():
    model = _tiny_model()
    ids = torch.randint(0, 50257, (2, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    out = model(ids, labels=labels)
    torch.testing.assert_close(causal_lm_loss(out.logits, labels), out.loss)
    with pytest.raises(ValueError, match="disagree"):
        causal_lm_loss(out.logits, labels[:, :-1])


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    setup = _build(train_examples=4, steps=8, lr=1e-2, eval_interval=0)  # 4 examples, batch 4: every step sees them all
    batch = setup.batch_fn([0, 1, 2, 3])
    with torch.no_grad():
        before = sft_loss(setup.model.eval(), batch)[0].item()
    setup.trainer.fit(setup.step_fn)
    with torch.no_grad():
        after = sft_loss(setup.model.eval(), batch)[0].item()
    assert after < before - 0.5, (before, after)
    rows = setup.trainer.train_log.rows
    assert len(rows) == 8 and rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in rows)


def test_resume_equals_uninterrupted(interrupt_at):
    full = _build(ckpt_interval=2, run_name="full")
    full.trainer.fit(full.step_fn, full.eval_fn)

    interrupted = _build(ckpt_interval=2, run_name="resumed")
    interrupt_at(interrupted, 2)
    resumed = _build(seed=1, ckpt_interval=2, run_name="resumed")  # other init: the checkpoint must overwrite it
    resumed.trainer.fit(resumed.step_fn, resumed.eval_fn, resume=True)

    assert resumed.trainer.step == full.trainer.step == 4
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    losses = lambda s: [r["loss"] for r in s.trainer.train_log.rows]
    assert losses(resumed) == losses(full)
    assert [r["val_loss"] for r in resumed.trainer.eval_log.rows] == [r["val_loss"] for r in full.trainer.eval_log.rows]


def test_lora_sft_trains_only_adapters():
    setup = _build(lora_rank=2, lora_alpha=4, steps=2)
    frozen = {n: p.detach().clone() for n, p in setup.model.named_parameters() if "lora_" not in n}
    assert any(isinstance(m, LoRALinear) for m in setup.model.modules())
    setup.trainer.fit(setup.step_fn)
    for name, p in setup.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        else:
            assert p.requires_grad


def test_bad_config_gives_a_clear_error():
    with pytest.raises(ValueError, match="unknown config key"):
        sft_config("smoke", learning_rate=1e-4)
    with pytest.raises(ValueError, match="lr must be positive"):
        sft_config("smoke", lr=-1e-4)
    with pytest.raises(ValueError, match="warmup_steps"):
        sft_config("smoke", steps=4, warmup_steps=4)
    with pytest.raises(ValueError, match="exceeds the model's context length 64"):
        _build(block_size=128)


def test_smoke_run_saves_the_model_that_load_or_train_sft_returns():
    from fm.sft import load_or_train_sft, sft_dir, train_sft

    cfg = sft_config("smoke", device="cpu")
    result = train_sft(cfg)
    assert (sft_dir(cfg) / "sft_config.json").exists()
    rows = result.trainer.eval_log.rows
    assert [r["step"] for r in rows] == [0, 2, 4] and all("val_loss" in r for r in rows)
    model, tokenizer = load_or_train_sft("smoke", device="cpu")  # loads: no second training run
    ids = torch.tensor([tokenizer.encode("Human: Hi\n\nAssistant:")])
    torch.testing.assert_close(model(ids).logits, result.model(ids).logits)
