import pytest
import torch

from fm.generate import generate, sample_next, top_k_filter, top_p_filter
from fm.model import GPT, GPTConfig
from tests.test_model import hf_tiny_gpt2, ours_from


@pytest.fixture(scope="module")
def pair():
    hf = hf_tiny_gpt2(seed=1)
    return hf, ours_from(hf)


def _prompts(lengths, vocab=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


def _left_pad(prompts, pad_id=0):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = p
        mask[i, T - len(p) :] = 1
    return ids, mask


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(top_p_filter(logits, 0.01)).tolist() == [[False, True, True, True]]
    assert torch.equal(top_p_filter(logits, 1.0), logits) and torch.equal(top_k_filter(logits, None), logits)
    shuffled = logits[:, [2, 0, 3, 1]]  # filters follow the values, not the positions
    assert torch.isinf(top_p_filter(shuffled, 0.8)).tolist() == [[True, False, True, False]]


def test_sample_next_draws_from_the_filtered_distribution():
    """The inverse-CDF draw: token frequencies match the (temperature-scaled, filtered) probabilities within 5
    standard errors, and filtered-out tokens are never drawn."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs).expand(20_000, -1)
    gen = torch.Generator().manual_seed(0)
    n = len(logits)
    for kwargs, expected in ((dict(), probs), (dict(temperature=0.5), probs**2 / (probs**2).sum()),
                             (dict(top_k=2), torch.tensor([0.625, 0.375, 0, 0, 0]))):
        counts = torch.bincount(sample_next(logits, generator=gen, **kwargs), minlength=5).float()
        se = (expected * (1 - expected) / n).sqrt()
        assert ((counts / n - expected).abs() <= 5 * se + 1e-9).all(), (kwargs, counts / n)
    assert (sample_next(logits, top_p=0.01, generator=gen) == 0).all()
    assert sample_next(torch.tensor([[0.0, 9.0, 1.0]]), temperature=0.0).item() == 1


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_k=50, top_p=0.9)])
def test_cached_equals_uncached(pair, sampling):
    _, ours = pair
    ids, mask = _left_pad(_prompts([5, 8]))
    run = lambda cache: generate(ours, ids, 12, attention_mask=mask, use_cache=cache,
                                 generator=torch.Generator().manual_seed(7), **sampling)
    runs = [run(True), run(False)]
    assert runs[0].shape == (2, 8 + 12)
    assert torch.equal(runs[0], runs[1])


def test_greedy_equals_transformers_generate(pair):
    hf, ours = pair
    ids = _prompts([6])[0][None]
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=15, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(ours, ids, 15, temperature=0.0), want)
    assert torch.equal(generate(hf, ids, 15, temperature=0.0), want)  # our loop also drives a transformers model


@pytest.mark.parametrize("which", ["ours", "hf"])
def test_left_padded_batch_equals_single_runs(pair, which):
    model = dict(zip(("hf", "ours"), pair, strict=True))[which]
    prompts = _prompts([3, 9, 6], seed=3)
    ids, mask = _left_pad(prompts)
    batched = generate(model, ids, 10, temperature=0.0, attention_mask=mask)
    for i, p in enumerate(prompts):
        single = generate(model, p[None], 10, temperature=0.0)
        assert torch.equal(batched[i, ids.shape[1] :], single[0, len(p) :]), f"row {i} differs"


def test_eos_stops_and_fills():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=32, vocab_size=5))
    ids = torch.tensor([[1, 2], [3, 4]])
    out = generate(model, ids, 25, eos_token_id=0, generator=torch.Generator().manual_seed(0))
    for row in out[:, 2:]:
        hits = (row == 0).nonzero()
        if len(hits):
            assert (row[hits[0, 0] :] == 0).all()
    if out.shape[1] < 27:
        assert (out[:, 2:] == 0).any(dim=1).all()  # stopped early only because every row ended


def test_sampling_is_seeded_and_model_mode_restored(pair):
    _, ours = pair
    ours.train()
    ids = _prompts([4])[0][None]
    a = generate(ours, ids, 8, generator=torch.Generator().manual_seed(1))
    b = generate(ours, ids, 8, generator=torch.Generator().manual_seed(1))
    assert ours.training
    ours.eval()
    assert torch.equal(a, b)


def test_errors(pair):
    _, ours = pair
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds context"):
        generate(ours, ids, 200)
    with pytest.raises(ValueError, match="temperature"):
        generate(ours, ids, 2, temperature=-1)
    with pytest.raises(ValueError, match="long tensor"):
        generate(ours, ids[0], 2)
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(torch.zeros(1, 3), 0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_kv_cache_work_ratio_counts_the_positions_generate_runs(pair, use_cache):
    from fm.generate import kv_cache_work_ratio

    _, ours = pair
    positions = []
    hook = ours.register_forward_pre_hook(lambda module, args: positions.append(args[0].shape[1]))
    try:
        generate(ours, _prompts([5])[0][None], 7, temperature=0.0, use_cache=use_cache)
    finally:
        hook.remove()
    # without the cache every step runs the prefix: 5 + 6 + ... + 11; with it the prefill 5, then 6 single tokens
    assert sum(positions) == ((5 + 6) if use_cache else sum(range(5, 12)))
    assert kv_cache_work_ratio(5, 7) == pytest.approx(sum(range(5, 12)) / (5 + 6))
    assert kv_cache_work_ratio(1, 200) == pytest.approx((200 + 200 * 199 / 2) / 200)  # (n + 1) / 2 for p = 1
    with pytest.raises(ValueError, match="new_tokens >= 1"):
        kv_cache_work_ratio(5, 0)
