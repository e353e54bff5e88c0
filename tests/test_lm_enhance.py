"""Task 1.4: distinct-n, the IPO loss, peak-memory measurement, the top-p (nucleus) filter, the KV-cache benchmark,
batched replies and the comparison config."""

import math
import statistics

import pytest
import torch

from common.memory import peak_memory
from fm.dpo import ipo_loss
from fm.metrics import distinct_n


def test_distinct_n_hand_computed():
    seqs = [[1, 2, 1, 2], [1, 2, 3]]
    # unigrams: 1,2,1,2,1,2,3 -> 3 unique of 7; bigrams: 12,21,12,12,23 -> 3 unique of 5
    assert distinct_n(seqs, 1) == pytest.approx(3 / 7)
    assert distinct_n(seqs, 2) == pytest.approx(3 / 5)
    assert distinct_n(["the cat the cat", "a dog"], 2) == pytest.approx(3 / 4)  # strings split on whitespace
    assert distinct_n([[5] * 10], 1) == pytest.approx(1 / 10)  # a looping generation scores low
    assert distinct_n([[1], []], 2) == 0.0  # no bigram at all


def test_distinct_n_bad_input():
    with pytest.raises(ValueError, match="n must be"):
        distinct_n([[1, 2]], 0)
    with pytest.raises(TypeError, match="single string"):
        distinct_n("not a list of sequences", 1)


def test_ipo_loss_hand_computed_and_target():
    beta = 0.5  # target margin 1 / (2 beta) = 1
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -2.0])
    losses, chosen, rejected = ipo_loss(pc, pr, rc, rr, beta=beta)
    # margins h: (0.5 - (-1.0)) = 1.5 -> (1.5 - 1)^2 = 0.25; (0 - 0) = 0 -> (0 - 1)^2 = 1
    torch.testing.assert_close(losses, torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(chosen, torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5, 0.0]))


def test_ipo_gradient_pushes_margin_towards_target():
    beta = 0.1
    ref = torch.zeros(3)
    # margins below, at and above the target 1 / (2 beta) = 5
    chosen = torch.tensor([1.0, 5.0, 9.0], requires_grad=True)
    losses, _, _ = ipo_loss(chosen, torch.zeros(3), ref, ref, beta=beta)
    losses.sum().backward()
    grad = chosen.grad
    assert grad[0] < 0 and grad[1] == 0 and grad[2] > 0  # gradient descent moves each margin to 5, unlike DPO


def test_ipo_bad_input():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        ipo_loss(x, torch.zeros(3), x, x)
    with pytest.raises(ValueError, match="label smoothing"):
        ipo_loss(x, x, x, x, label_smoothing=0.1)


def test_peak_memory_sees_a_torch_allocation():
    with peak_memory("cpu") as mem:
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB of float32, outside tracemalloc's view
        big += 1
        del big
    assert mem["peak_mb"] >= 60, mem
    with peak_memory("cpu") as small:
        torch.ones(10)
    assert small["peak_mb"] < 60, small


def _brute_force_nucleus(probs: torch.Tensor, p: float) -> set[int]:
    """Smallest set of tokens, most probable first, whose total probability reaches p."""
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    kept, total = set(), 0.0
    for i in order:
        kept.add(i)
        total += float(probs[i])
        if total >= p:
            break
    return kept


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_smallest_set_reaching_p(p):
    from fm.generate import top_p_filter

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator) * 3
    filtered = top_p_filter(logits, p)
    assert filtered.shape == logits.shape
    for row, out in zip(logits, filtered, strict=True):
        probs = row.softmax(-1)
        kept = {i for i in range(len(row)) if math.isfinite(float(out[i])) and float(out[i]) > -1e30}
        assert kept == _brute_force_nucleus(probs, p)
        assert float(probs[list(kept)].sum()) >= p - 1e-6
        idx = sorted(kept)
        torch.testing.assert_close(out[idx], row[idx])  # kept logits are untouched


def test_top_p_one_keeps_everything_and_argmax_always_survives():
    from fm.generate import top_p_filter

    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    torch.testing.assert_close(top_p_filter(logits, 1.0), logits)
    tiny = top_p_filter(logits, 1e-6)
    assert torch.isfinite(tiny[0, 0]) and tiny[0, 0] == 5.0
    assert (tiny[0, 1:] < -1e30).all()


@pytest.fixture(scope="module")
def tiny_lm():
    from fm.pretrained import load_lm

    return load_lm("tiny", device="cpu", verbose=False)


def test_batched_left_padded_replies_equal_one_by_one(tiny_lm):
    from fm.generate import sample_completions

    model, tokenizer = tiny_lm
    prompts = ["Human: Hi!\n\nAssistant:", "Human: What is your favourite book and why?\n\nAssistant:"]
    batched = sample_completions(model, tokenizer, prompts, 6, batch_size=2, temperature=0.0).replies
    single = [sample_completions(model, tokenizer, [p], 6, temperature=0.0).replies[0] for p in prompts]
    assert batched == single


class LikesLineBreaks(torch.nn.Module):
    """A model whose logit of one line-break token is raised, so that some sampled replies end early."""

    def __init__(self, model, token: int):
        super().__init__()
        self.model, self.token, self.config = model, token, model.config

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        out.logits[..., self.token] += 8.0
        return out


class CountingVocab:
    """A tokenizer of one-text tokens that counts its decodes."""

    eos_token_id = 0

    def __init__(self, texts: list[str]):
        self.texts, self.decodes = texts, 0

    def __len__(self) -> int:
        return len(self.texts)

    def decode(self, ids: list[int]) -> str:
        self.decodes += 1
        return "".join(self.texts[i] for i in ids)


def test_line_end_ids_decode_the_vocabulary_once_per_tokenizer_and_size():
    from fm.generate import line_end_ids

    vocab = CountingVocab(["<eos>", "a", "\n", "b\n", "c"])
    ends = line_end_ids(vocab)
    assert ends == [0, 2, 3] and vocab.decodes == 5
    ends.append(4)  # the caller's own list
    assert line_end_ids(vocab) == [0, 2, 3] and vocab.decodes == 5
    vocab.texts.append("\n\n")  # a token added (as a pad is): the vocabulary is decoded again
    assert line_end_ids(vocab) == [0, 2, 3, 5] and vocab.decodes == 11
    other = CountingVocab(["<eos>", "\n"])
    assert line_end_ids(other) == [0, 1] and other.decodes == 2


def test_a_reply_is_one_line_and_its_ids_are_the_sampled_ones(tiny_lm):
    from fm.generate import line_end_ids, sample_completions

    model, tokenizer = tiny_lm
    stop = set(line_end_ids(tokenizer))
    assert tokenizer.eos_token_id in stop and tokenizer.encode("\n\n")[0] in stop
    assert tokenizer.encode(" hi")[0] not in stop
    prompts = [f"Human: message {i}\n\nAssistant:" for i in range(24)]
    model = LikesLineBreaks(model, tokenizer.encode("\n\n")[0])
    out = sample_completions(model, tokenizer, prompts, max_new_tokens=30, batch_size=8, seed=0)
    assert len(out) == 24 and out.prompts == prompts
    for prompt, ids, prompt_ids, reply in zip(out.prompts, out.completion_ids, out.prompt_ids, out.replies,
                                              strict=True):
        assert prompt_ids == tokenizer.encode(prompt)  # no padding kept
        assert all(t not in stop for t in ids[:-1]) and (ids[-1] in stop or len(ids) == 30)
        assert "\n" not in reply
    assert any(ids[-1] in stop for ids in out.completion_ids)  # some replies do end before the limit
    again = sample_completions(model, tokenizer, prompts, max_new_tokens=30, batch_size=8, seed=0)
    assert again.completion_ids == out.completion_ids  # same seed, same samples
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        sample_completions(model, tokenizer, [], max_new_tokens=4)


def test_generate_stops_at_any_of_several_stop_ids(tiny_lm):
    from fm.generate import generate

    model, _ = tiny_lm
    prompt = torch.tensor([[1, 2, 3]])
    free = generate(model, prompt, 6, temperature=0.0)[0, 3:].tolist()
    stops = [free[2], 50_000]
    stopped = generate(model, prompt, 6, temperature=0.0, eos_token_id=stops)[0, 3:].tolist()
    first = next(i for i, t in enumerate(free) if t in stops)
    assert stopped[: first + 1] == free[: first + 1] and set(stopped[first + 1 :]) <= {stops[0]}
    with pytest.raises(ValueError, match="empty list"):
        generate(model, prompt, 2, eos_token_id=[])


def test_mean_ci_and_win_rate_arithmetic():
    from fm.metrics import Z_95, mean_ci, win_rate, win_scores

    mean, low, high = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = Z_95 * statistics.stdev([1, 2, 3, 4]) / 2
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert win_scores([1.0, 0.0, 0.5, 0.2], [0.0, 0.0, 1.0, 0.1]).tolist() == [1.0, 0.5, 0.0, 1.0]  # a tie: half
    rate, low, high = win_rate([1.0, 0.0, 0.5, 0.2], [0.0, 0.0, 1.0, 0.1])
    assert rate == pytest.approx(0.625)
    assert high - rate == pytest.approx(rate - low) == pytest.approx(Z_95 * statistics.stdev([1, 0.5, 0, 1]) / 2)
    assert win_rate([0.3] * 5, [0.3] * 5) == (0.5, 0.5, 0.5)  # all ties: exactly one half, no spread
    with pytest.raises(ValueError, match="same prompts"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 values"):
        mean_ci([1.0])


def test_kv_cache_benchmark_same_tokens(tiny_lm):
    from fm.generate import kv_cache_benchmark, kv_cache_work_ratio

    model, tokenizer = tiny_lm
    prompts = torch.tensor([tokenizer.encode("Human: Hi!\n\nAssistant:")] * 2)
    rows = kv_cache_benchmark(model, prompts, [4, 8], repeats=3)
    assert [r["new_tokens"] for r in rows] == [4, 8] and all(r["repeats"] == 3 for r in rows)
    assert all(r["same_tokens"] and r["cached_s"] > 0 and r["uncached_s"] > 0 for r in rows)
    for r in rows:  # both rows of the batch count, and the speed-up is the ratio of the median times
        assert r["cached_tokens_per_s"] == pytest.approx(2 * r["new_tokens"] / r["cached_s"])
        assert r["speedup"] == pytest.approx(r["uncached_s"] / r["cached_s"])
        assert r["speedup_min"] <= r["speedup_max"]
        assert r["work_ratio"] == pytest.approx(kv_cache_work_ratio(prompts.shape[1], r["new_tokens"]))
    with pytest.raises(ValueError, match="repeats"):
        kv_cache_benchmark(model, prompts, [4], repeats=0)


@pytest.mark.parametrize("overrides, match", [
    (dict(variants=(("dpo", 0.1), ("kto", 0.1))), "unknown preference variants"),
    (dict(variants=(("dpo", 0.0),)), "beta > 0"),
    (dict(ft_steps=0), "ft_steps"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(seeds=(0, 0)), "seeds must be distinct"),
])
def test_lm_enhance_config_rejects_bad_values(overrides, match):
    from fm.comparisons import lm_enhance_config

    with pytest.raises(ValueError, match=match):
        lm_enhance_config("smoke", **overrides)
    with pytest.raises(ValueError, match="unknown config key"):
        lm_enhance_config("smoke", not_a_field=1)


def test_seed_spread_means_and_ranges_per_setting():
    from fm.comparisons import seed_spread

    rows = [{"loss": "DPO", "beta": 0.1, "seed": s, "reward": r, "kl": k} for s, r, k in ((0, 0.5, 2.0), (1, 0.7, 4.0))]
    rows.append({"loss": "IPO", "beta": 0.1, "seed": 0, "reward": 0.6, "kl": 1.0})
    out = seed_spread(rows, keys=("reward", "kl"))
    assert [(r["loss"], r["seeds"]) for r in out] == [("DPO", 2), ("IPO", 1)]
    assert out[0]["reward_mean"] == pytest.approx(0.6) and out[0]["reward_spread"] == pytest.approx(0.2)
    assert out[0]["kl_mean"] == pytest.approx(3.0) and out[1]["kl_spread"] == 0.0
