import pytest

from fm.tokenizer import EOS_TOKEN_ID, get_gpt2_tokenizer


def test_known_gpt2_ids():
    tok = get_gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.eos_token_id == tok.pad_token_id == EOS_TOKEN_ID == 50256
    assert tok.vocab_size == len(tok) == 50257


def test_round_trip_unicode_and_whitespace():
    tok = get_gpt2_tokenizer()
    text = "Human: Hello, my name is Kate. Héllo wörld 🤖\n\n  Assistant:\tok 123"
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_endoftext_is_one_special_token():
    tok = get_gpt2_tokenizer()
    ids = tok.encode("a<|endoftext|>b")
    assert ids == [64, EOS_TOKEN_ID, 65]
    assert tok.decode(ids) == "a<|endoftext|>b"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_bad_input_errors():
    tok = get_gpt2_tokenizer()
    with pytest.raises(TypeError):
        tok.encode(123)
    with pytest.raises(ValueError, match="vocabulary"):
        tok.decode([50257])
