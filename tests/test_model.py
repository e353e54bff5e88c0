import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fm.model import GPT, GPTConfig


def hf_tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A random transformers GPT-2 small enough for tests (its non-zero biases make the parity check meaningful)."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=1000, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return model


def ours_from(hf: GPT2LMHeadModel) -> GPT:
    model = GPT(GPT.config_from_hf(hf.config.to_dict()))
    model.load_hf_state_dict(hf.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def pair():
    hf = hf_tiny_gpt2()
    return hf, ours_from(hf)


def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, 1000, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_logits_to_keep_is_the_last_positions_as_in_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, 1000, (2, 9))
    full = ours(ids).logits
    for n in (1, 4):
        kept = ours(ids, logits_to_keep=n).logits
        assert kept.shape == (2, n, 1000) and torch.allclose(kept, full[:, -n:], atol=1e-5)
        assert torch.allclose(kept, hf(ids, logits_to_keep=n).logits, atol=1e-4)
    with pytest.raises(ValueError, match="logits_to_keep"):
        ours(ids, labels=ids, logits_to_keep=1)


def test_logits_match_transformers_with_left_padding(pair):
    hf, ours = pair
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :1] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate passes
    with torch.no_grad():
        ours_logits = ours(ids, attention_mask=mask).logits
        hf_logits = hf(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()  # logits at padding positions are never used
    assert not torch.isnan(ours_logits).any()
    torch.testing.assert_close(ours_logits[real], hf_logits[real], atol=1e-5, rtol=1e-5)
    # a padded row gives the same logits as the same prompt without padding
    with torch.no_grad():
        alone = ours(ids[:1, 5:]).logits
    torch.testing.assert_close(ours_logits[0, 5:], alone[0], atol=1e-5, rtol=1e-5)


def test_loss_matches_transformers_with_ignored_labels(pair):
    hf, ours = pair
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        ours_loss, hf_loss = ours(ids, labels=labels).loss, hf(ids, labels=labels).loss
    torch.testing.assert_close(ours_loss, hf_loss, atol=1e-5, rtol=1e-5)


def test_kv_cache_matches_full_forward(pair):
    _, ours = pair
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(ids).logits
        first = ours(ids[:, :6], use_cache=True)
        rest = ours(ids[:, 6:], past_key_values=first.past_key_values).logits
    assert len(first.past_key_values) == 2 and first.past_key_values[0][0].shape == (2, 2, 6, 32)
    torch.testing.assert_close(torch.cat([first.logits, rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_weight_tying_and_presets():
    model = GPT(GPTConfig.from_preset("tiny"))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert GPTConfig.from_preset("gpt2").n_embd == 768 and GPTConfig.from_preset("gpt2-medium").n_layer == 24
    with pytest.raises(ValueError, match="unknown GPT preset"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)


def test_save_pretrained_round_trip_in_both_libraries(tmp_path, pair):
    hf, ours = pair
    ours.save_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        want = ours(ids).logits
        torch.testing.assert_close(GPT.from_pretrained(tmp_path / "ours")(ids).logits, want)
        torch.testing.assert_close(GPT.from_pretrained(tmp_path / "hf")(ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(tmp_path / "ours")(ids).logits, want,
                                   atol=1e-5, rtol=1e-5)


def test_clear_errors(tmp_path):
    model = GPT(GPTConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))
    with pytest.raises(RuntimeError, match="cannot load"):
        GPT.from_pretrained("no-such-user/no-such-model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path)


def _both_impls(seed: int = 0) -> tuple[GPT, GPT]:
    """The tiny preset with dropout, on the manual and the SDPA attention, same weights."""
    torch.manual_seed(seed)
    manual = GPT(GPTConfig.from_preset("tiny", dropout=0.1))
    sdpa = GPT(GPTConfig.from_preset("tiny", dropout=0.1, attn_impl="sdpa"))
    sdpa.load_state_dict(manual.state_dict())
    return manual.eval(), sdpa.eval()


def test_sdpa_gpt_equals_manual_with_left_padding_and_gradients():
    models = _both_impls()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 1000, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100  # the loss reads logits at real positions only
    outs = [model(ids, attention_mask=mask, labels=labels) for model in models]  # eval mode: dropout off
    real = mask.bool()
    assert not torch.isnan(outs[1].logits).any()
    torch.testing.assert_close(outs[1].logits[real], outs[0].logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=1e-5, rtol=1e-5)
    for out in outs:
        out.loss.backward()
    for (name, p_manual), p_sdpa in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p_sdpa.grad, p_manual.grad, atol=1e-5, rtol=1e-5, msg=name)
    with torch.no_grad():  # no mask: the kernel's own causal mask
        torch.testing.assert_close(models[1](ids).logits, models[0](ids).logits, atol=1e-5, rtol=1e-5)


def test_sdpa_gpt_equals_manual_in_cached_decoding():
    models = _both_impls(1)
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded prompt of 6 positions, then 4 tokens decoded one at a time
    steps = []
    with torch.no_grad():
        for model in models:
            out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
            logits = [out.logits[:, -1]]
            for t in range(6, 10):
                out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values,
                            use_cache=True)
                logits.append(out.logits[:, -1])
            steps.append(torch.stack(logits, dim=1))
    torch.testing.assert_close(steps[1], steps[0], atol=1e-5, rtol=1e-5)


def test_attn_impl_is_validated_and_reaches_every_block(tmp_path):
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        GPTConfig(attn_impl="flash")
    model = GPT(GPTConfig.from_preset("tiny", attn_impl="sdpa"))
    assert all(block.attn.attn_impl == "sdpa" for block in model.transformer.h)
    model.save_pretrained(tmp_path)
    assert GPT.from_pretrained(tmp_path, attn_impl="sdpa").transformer.h[0].attn.attn_impl == "sdpa"
    assert GPT.from_pretrained(tmp_path).transformer.h[0].attn.attn_impl == "manual"  # the homework's by default


def test_full_profile_uses_sdpa():
    from fm.pretrained import load_lm
    from fm.sft import sft_config

    cfg = sft_config("full")
    assert cfg.attn_impl == "sdpa" and sft_config("quick").attn_impl == "manual"
    model, _ = load_lm("tiny", device="cpu", verbose=False, attn_impl=cfg.attn_impl)
    assert {block.attn.attn_impl for block in model.transformer.h} == {"sdpa"}


def test_projection_weights_are_stored_in_conv1d_order():
    model = GPT(GPTConfig.from_preset("tiny"))
    for name, p in model.named_parameters():
        if name.endswith(GPT._CONV1D):  # (out, in) shape, (in, out) memory: the fast matmul on CPU
            assert p.t().is_contiguous(), name
    assert all(v.is_contiguous() for v in model.hf_state_dict().values())  # what safetensors needs


def test_old_transformers_is_refused_at_import(monkeypatch):
    import fm

    monkeypatch.setattr(fm, "version", lambda name: "4.57.1")
    with pytest.raises(ImportError, match=r"transformers 4.57.1 is installed.*pip install 'transformers>=5,<6'"):
        fm._check_transformers()
    monkeypatch.setattr(fm, "version", lambda name: "5.24.0")
    fm._check_transformers()
