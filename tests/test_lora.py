"""LoRA on our GPT (nn.Linear), HF GPT-2 (Conv1D) and Llama (nn.Linear): identity at init, merge exactness,
only adapters train, clear errors."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from common.params import count_parameters
from fm.lora import LoRALinear, apply_lora, merge_lora
from fm.model import GPT, GPTConfig


def _ours():
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=100))


def _hf_gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=100))


def _llama():
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        hidden_size=32, intermediate_size=64, vocab_size=100,
                                        max_position_embeddings=32))


MODELS = {"ours": (_ours, 4), "hf_gpt2": (_hf_gpt2, 4), "llama": (_llama, 7)}  # wrapped layers per block


@pytest.mark.parametrize("name", MODELS)
def test_lora_starts_as_base_and_merges_exactly(name):
    torch.manual_seed(0)
    build, per_block = MODELS[name]
    model = build().eval()
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    before = model(ids, attention_mask=mask).logits
    total = count_parameters(model)

    lora = apply_lora(copy.deepcopy(model), rank=4, alpha=8)
    layers = [m for m in lora.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * per_block
    trainable, total_lora = count_parameters(lora, trainable_only=True), count_parameters(lora)
    assert trainable == sum(m.lora_A.numel() + m.lora_B.numel() for m in layers)
    assert total_lora == total + trainable
    torch.testing.assert_close(lora(ids, attention_mask=mask).logits, before)  # B = 0: no change at init

    for m in layers:  # a trained-looking update
        torch.nn.init.normal_(m.lora_B, std=0.1)
    unmerged = lora(ids, attention_mask=mask).logits
    assert (unmerged - before).abs().max() > 1e-3
    merged = merge_lora(lora)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert count_parameters(merged, trainable_only=True) == count_parameters(merged) == total
    torch.testing.assert_close(merged(ids, attention_mask=mask).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_only_adapters_get_gradients():
    torch.manual_seed(0)
    model = apply_lora(_hf_gpt2(), rank=2, alpha=4, targets=("c_attn",))
    model(torch.randint(0, 100, (1, 8)), labels=torch.randint(0, 100, (1, 8))).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


def test_bad_lora_arguments_raise():
    with pytest.raises(ValueError, match="no module"):
        apply_lora(_ours(), rank=4, alpha=8, targets=("query",))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(_ours(), rank=0, alpha=8)
    with pytest.raises(ValueError, match="already"):
        apply_lora(apply_lora(_ours(), rank=2, alpha=2), rank=2, alpha=2)
