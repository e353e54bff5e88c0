
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fm.pretrained as pretrained
from fm.generate import generate
from fm.model import GPT
from fm.pretrained import load_lm, save_lm
from fm.tokenizer import GPT2Tokenizer
from tests.test_model import hf_tiny_gpt2


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids)).logits


def test_tiny_is_deterministic_and_saves_round_trip(tmp_path):
    model, tok = load_lm("tiny", device="cpu", verbose=False)
    again, _ = load_lm("tiny", device="cpu", verbose=False)
    assert isinstance(model, GPT) and isinstance(tok, GPT2Tokenizer) and tok.pad_token_id == 50256
    ids = torch.tensor([tok.encode("Human: hi\n\nAssistant:")])
    torch.testing.assert_close(_logits(model, ids), _logits(again, ids))
    with torch.no_grad():
        model.transformer.wte.weight.add_(0.01)  # "fine-tuned"
    save_lm(model, tok, tmp_path / "lm")
    loaded, loaded_tok = load_lm(tmp_path / "lm", device="cpu", verbose=False)
    assert isinstance(loaded, GPT) and isinstance(loaded_tok, GPT2Tokenizer)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))


def test_transformers_gpt2_dir_loads_with_gpt2_tokenizer(tmp_path):
    hf = hf_tiny_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    model, tok = load_lm(tmp_path / "hf", device="cpu", verbose=False)
    assert type(model).__name__ == "GPT2LMHeadModel" and isinstance(tok, GPT2Tokenizer)
    ids = torch.randint(0, 1000, (1, 6))
    torch.testing.assert_close(_logits(model, ids), _logits(hf, ids))


def test_auto_falls_back_to_smollm2_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    chosen = []
    tiny = (pretrained._tiny_gpt("manual"), pretrained.get_gpt2_tokenizer())
    monkeypatch.setattr(pretrained, "_load", lambda name, device, attn_impl: chosen.append(name) or tiny)
    load_lm("auto", device="cpu")
    assert chosen == ["smollm2-135m"]
    out = capsys.readouterr().out
    assert "smollm2-135m (auto: " in out and "HF_HUB_OFFLINE" in out


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown LM"):
        load_lm("gpt-17", verbose=False)


@pytest.fixture(scope="module")
def smollm2():
    return load_lm("smollm2-135m", device="cpu", verbose=False)


@pytest.mark.slow
def test_smollm2_loads_and_continues_sensibly(smollm2):
    model, tok = smollm2
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    ids = torch.tensor([tok.encode("The capital of France is")])
    logits = _logits(model, ids)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    out = generate(model, ids, 6, temperature=0.0)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


@pytest.mark.slow
def test_save_lm_with_hf_tokenizer_round_trip(smollm2, tmp_path):
    _, tok = smollm2
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    save_lm(model, tok, tmp_path / "llama")
    loaded, loaded_tok = load_lm(tmp_path / "llama", device="cpu", verbose=False)
    text = "Human: Hello, my name is Kate."
    assert loaded_tok.encode(text) == tok.encode(text) and loaded_tok.pad_token_id == tok.pad_token_id
    ids = torch.tensor([tok.encode(text)])
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))
