"""SFT training: the loss, accumulation equal to one batch, a few steps fit a fixed batch, bit-exact resume, LoRA,
config errors, runs keyed by their config."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from common.data import batch_indices
from fm.data import IGNORE_INDEX
from fm.lora import LoRALinear
from fm.losses import causal_lm_loss
from fm.model import GPT, GPTConfig
from fm.sft import build_sft, sft_config, sft_loss
from fm.tokenizer import get_gpt2_tokenizer
from fm.training import is_saved


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


def _gradients_of_one_step(setup) -> tuple[dict[str, torch.Tensor], dict]:
    """Run step 0 of `setup` and return the gradients it hands to the optimizer (no update is made) and its metrics."""
    grads = {}

    def capture(name: str) -> float:
        grads.update({n: p.grad.clone() for n, p in setup.model.named_parameters()})
        setup.model.zero_grad(set_to_none=True)
        return 0.0

    setup.trainer.optimizer_step = capture
    setup.model.train()
    return grads, setup.step_fn(0)


def test_accumulated_micro_batches_equal_one_batch():
    """2 micro-batches of 2 give the loss and gradients of one batch of 4 (TRL's token normalisation), although
    the examples' replies have different lengths, so a mean of per-micro-batch token means would differ."""
    tiny_gpt = lambda: GPT(GPTConfig.from_preset("tiny")).double()
    runs = {}
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        setup = build_sft(_cfg(batch_size=batch_size, grad_accum=grad_accum), tiny_gpt(), get_gpt2_tokenizer())
        runs[grad_accum] = (setup, *_gradients_of_one_step(setup))
    (one, grads_one, metrics_one), (_, grads_acc, metrics_acc) = runs[1], runs[2]
    torch.testing.assert_close(metrics_acc["loss"], metrics_one["loss"])
    for name, grad in grads_one.items():
        torch.testing.assert_close(grads_acc[name], grad, msg=name)

    indices = batch_indices(len(one.train), 4, 0, one.cfg.seed).tolist()  # step 0's examples, in both settings
    halves = [one.batch_fn(indices[:2]), one.batch_fn(indices[2:])]
    tokens = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in halves]
    assert tokens[0] != tokens[1], tokens  # otherwise both normalisations agree and the test proves nothing
    with torch.no_grad():
        one.model.eval()
        mean_of_means = sum(sft_loss(one.model, b)[0] for b in halves) / 2
        whole = sft_loss(one.model, one.batch_fn(indices))[0]
    torch.testing.assert_close(metrics_one["loss"], whole)
    assert abs(float(mean_of_means - whole)) > 1e-6


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
    assert is_saved(sft_dir(cfg)) and result.folder == sft_dir(cfg)
    rows = result.eval_rows
    assert [r["step"] for r in rows] == [0, 2, 4] and all("val_loss" in r for r in rows)
    loaded = load_or_train_sft("smoke", device="cpu")  # loads: no second training run
    assert loaded.folder == result.folder and loaded.eval_rows == rows  # its logs, read back from the run folder
    ids = torch.tensor([loaded.tokenizer.encode("Human: Hi\n\nAssistant:")])
    torch.testing.assert_close(loaded.model(ids).logits, result.model(ids).logits)


def test_run_folders_are_keyed_by_the_training_config(capsys):
    from fm.sft import load_or_train_sft, sft_dir

    base = sft_config("smoke")
    assert sft_dir(sft_config("smoke", device="cpu", ckpt_interval=2, eval_interval=1)) == sft_dir(base)
    other_lr = sft_config("smoke", lr=2e-3)
    assert sft_dir(other_lr) != sft_dir(base)
    load_or_train_sft("smoke", device="cpu", steps=2)
    assert "training it" in capsys.readouterr().out
    load_or_train_sft("smoke", device="cpu", steps=2, lr=2e-3)  # the override counts: another model
    assert "training it" in capsys.readouterr().out
    assert is_saved(sft_dir(sft_config("smoke", steps=2, lr=2e-3)))
    load_or_train_sft("smoke", device="cpu", steps=2, lr=2e-3)
    assert "loading the SFT model" in capsys.readouterr().out


def test_perplexity_is_exp_of_the_loss_over_every_reply_token():
    from fm.sft import perplexity, validation_examples

    cfg, model, tokenizer = _cfg(batch_size=3), _tiny_model().eval(), get_gpt2_tokenizer()
    out = perplexity(model, tokenizer, cfg)
    examples = validation_examples(cfg, tokenizer)
    nll, tokens = 0.0, 0
    for ex in examples:  # one example at a time: no padding, the loss summed by hand
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        scored = labels[0, 1:] != IGNORE_INDEX
        nll -= logp[scored].gather(-1, labels[0, 1:][scored, None]).sum().item()
        tokens += int(scored.sum())
    assert out["tokens"] == tokens and out["examples"] == len(examples) == cfg.eval_examples
    assert out["loss"] == pytest.approx(nll / tokens, rel=1e-4)
    assert out["perplexity"] == pytest.approx(torch.tensor(nll / tokens).exp().item(), rel=1e-4)


def test_display_name_names_the_model_in_words():
    from fm.pretrained import display_name

    assert display_name(GPT(GPTConfig.from_preset("gpt2"))) == "GPT-2 (124M)"
    assert display_name(GPT(GPTConfig.from_preset("tiny"))).startswith("GPT (")
