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
