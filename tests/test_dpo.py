import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from fm.dpo import (
    PREFERENCE_LOSSES,
    dpo_config,
    dpo_dir,
    dpo_loss,
    ipo_loss,
    make_preference_loss_fn,
    reward_accuracy,
)
from fm.dpo_analysis import (
    SUMMARY_KEYS,
    PolicyEval,
    compare_to_baseline,
    completion_logps,
    conditional_vs_joint,
    dpo_summary,
    evaluate_policy,
    frontier_point,
    gradient_weighting_check,
    rewards_by_kind,
)
from fm.dpo_train import build_dpo, load_dpo_models, train_dpo
from fm.logps import concatenated_logps, sequence_logps
from fm.reward import sentiment_reward
from fm.sft import sft_config
from fm.tokenizer import get_gpt2_tokenizer


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Sampled pairs, reference log-probs and evaluations of a test in its own cache folder."""
    monkeypatch.setenv("HW3_CACHE_DIR", str(tmp_path / "cache"))


def tiny_lm(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, initializer_range=0.3)
    return GPT2LMHeadModel(config).eval()


def small_gpt2(seed: int = 0, **config) -> GPT2LMHeadModel:
    """A random GPT-2-vocabulary model (with dropout 0.1, which DPO turns off), small enough for a test."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, **config))


def random_batch(pairs: int = 3, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """A concatenated batch (chosen rows, then rejected rows) with right padding and prompt/response masks."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (2 * pairs, length), generator=g)
    attention = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids)
    for row in range(2 * pairs):
        n_real = length - row % 3  # some rows padded
        attention[row, n_real:] = 0
        loss_mask[row, 4:n_real] = 1  # 4 prompt tokens, then the response
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def test_dpo_loss_hand_computed():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5))
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # h = 0.5 * ((-10 + 11) - (-12 + 11.5)) = 0.75
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.75)), abs=1e-6)
    assert chosen_r.item() == pytest.approx(0.5) and rejected_r.item() == pytest.approx(-0.25)
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    expected = 0.8 * math.log1p(math.exp(-0.75)) + 0.2 * math.log1p(math.exp(0.75))
    assert smoothed.item() == pytest.approx(expected, abs=1e-6)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logps = torch.randn(4, 5) * 20
    losses, chosen_r, rejected_r = dpo_loss(logps[0], logps[1], logps[0], logps[1], beta=0.3)
    torch.testing.assert_close(losses, torch.full((5,), math.log(2)))
    assert reward_accuracy(chosen_r, rejected_r).tolist() == [0.5] * 5  # ties count half: start at 0.5


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-5.0, -3.0], requires_grad=True), torch.tensor([-4.0, -6.0], requires_grad=True)
    # pair 0 is ranked wrongly (chosen reward < rejected reward), pair 1 rightly
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, torch.tensor([-4.0, -4.0]), torch.tensor([-5.0, -5.0]))
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises log pi(y_w), lowers log pi(y_l)
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    weights = 0.1 * torch.sigmoid(rejected_r - chosen_r)
    torch.testing.assert_close(-pc.grad, weights)
    torch.testing.assert_close(pr.grad, weights)
    assert weights[0] > weights[1]  # the wrongly ranked pair gets the larger update


@pytest.mark.parametrize(
    "shapes, beta, smoothing, match",
    [
        (((3,), (3,), (3,), (4,)), 0.1, 0.0, "same shape"),
        (((3, 1), (3, 1), (3, 1), (3, 1)), 0.1, 0.0, "same shape"),
        (((3,), (3,), (3,), (3,)), 0.0, 0.0, "beta must be > 0"),
        (((3,), (3,), (3,), (3,)), -1.0, 0.0, "beta must be > 0"),
        (((3,), (3,), (3,), (3,)), 0.1, 0.5, "label_smoothing"),
    ],
)
def test_dpo_loss_rejects_bad_input(shapes, beta, smoothing, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(*(torch.zeros(s) for s in shapes), beta=beta, label_smoothing=smoothing)


def test_sequence_logps_matches_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    mask = (torch.rand(3, 7, generator=g) > 0.4).long()
    labels_with_ignore = labels.masked_fill(mask == 0, -100)  # -100 where masked must not break the gather
    expected = torch.zeros(3)
    for b in range(3):
        for t in range(1, 7):
            if mask[b, t]:
                expected[b] += F.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
    torch.testing.assert_close(sequence_logps(logits, labels_with_ignore, mask), expected)
    with pytest.raises(ValueError, match="expected logits"):
        sequence_logps(logits, labels[:, :5], mask)


def test_concatenated_pass_equals_separate_passes():
    model, batch = tiny_lm(), random_batch()
    chosen, rejected = concatenated_logps(model, batch)
    for rows, got in ((slice(0, 3), chosen), (slice(3, 6), rejected)):
        part = {k: v[rows] for k, v in batch.items()}
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
        torch.testing.assert_close(got, sequence_logps(logits, part["input_ids"], part["loss_mask"]))
    with pytest.raises(ValueError, match="even row count"):
        concatenated_logps(model, {k: v[:5] for k, v in batch.items()})


def test_conditional_and_joint_forms_agree_on_a_real_model():
    policy, reference = (small_gpt2(seed, initializer_range=0.5).double().eval() for seed in (1, 2))
    pair = {"prompt": "Human: How are you?\n\nAssistant:", "chosen": "Great, thanks!", "rejected": "Go away."}
    out = conditional_vs_joint(policy, reference, get_gpt2_tokenizer(), pair, beta=0.1)
    assert abs(out["policy_log_p_prompt"] - out["reference_log_p_prompt"]) > 0.1  # the prompt terms really differ
    assert out["abs_difference"] < 1e-10
    assert abs(out["margin_conditional"]) > 1e-3


def test_gradient_weighting_matches_autograd():
    policy, batch = tiny_lm().double(), random_batch()
    with torch.no_grad():
        ref_chosen, ref_rejected = concatenated_logps(tiny_lm(seed=3).double(), batch)
    out = gradient_weighting_check(policy, batch, ref_chosen, ref_rejected, beta=0.5)
    assert out["param_grad_rel_error"] < 1e-10 and out["logp_grad_max_error"] < 1e-12
    assert out["param_grad_norm"] > 0


def build(seed: int = 0, **overrides):
    base = dict(run_name="test", data_source="chitchat", train_pairs=4, val_pairs=4, batch_size=4, eval_batch_size=4,
                steps=6, lr=3e-3, warmup_steps=1, eval_interval=3, device="cpu")
    return build_dpo(dpo_config("smoke", **{**base, **overrides}), model=small_gpt2(seed),
                     tokenizer=get_gpt2_tokenizer())


def test_dpo_training_learns_the_pairs_and_starts_at_chance():
    setup = build()
    setup.trainer.fit(setup.step_fn, setup.eval_fn)
    first, last = setup.trainer.train_log.rows[0], setup.trainer.train_log.rows[-1]
    start = setup.trainer.eval_log.rows[0]
    assert start["step"] == 0 and start["val_rewards/accuracies"] == 0.5
    assert start["val_loss"] == pytest.approx(math.log(2))
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference before the first update
    losses = [r["loss"] for r in setup.trainer.train_log.rows]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < losses[0] - 0.2
    assert last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > 0
    assert last["logps/rejected"] < first["logps/rejected"]
    assert [r["step"] for r in setup.trainer.eval_log.rows] == [0, 3, 6]
    assert all(not p.requires_grad for p in setup.reference.parameters())
    rows = rewards_by_kind(setup.policy, setup.val_data, setup.cfg.beta)
    assert rows[-1]["kind"] == "all" and rows[-1]["pairs"] == len(setup.val_data)
    assert rows[-1]["reward_acc"] == pytest.approx(setup.trainer.eval_log.rows[-1]["val_rewards/accuracies"])


def test_dpo_resume_equals_uninterrupted(interrupt_at):
    full = build(run_name="full", steps=4, eval_interval=2, ckpt_interval=2)
    full.trainer.fit(full.step_fn, full.eval_fn)
    interrupted = build(run_name="resumed", steps=4, eval_interval=2, ckpt_interval=2)
    interrupt_at(interrupted, 2)
    resumed = build(run_name="resumed", steps=4, eval_interval=2, ckpt_interval=2)
    resumed.trainer.fit(resumed.step_fn, resumed.eval_fn, resume=True)
    for (name, a), (_, b) in zip(full.policy.state_dict().items(), resumed.policy.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in resumed.trainer.train_log.rows] == [r["loss"] for r in full.trainer.train_log.rows]
    assert resumed.trainer.eval_log.rows == full.trainer.eval_log.rows


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(beta=0.0), "beta must be > 0"),
        (dict(lr=-1.0), "lr must be positive"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(data_source="imdb"), "data_source"),
        (dict(train_pairs=1), "must cover one batch"),
        (dict(steps=1, warmup_steps=1), "warmup_steps"),
        (dict(loss="kto"), "loss must be one of"),
        (dict(loss="cdpo"), "cdpo.*label_smoothing > 0"),
        (dict(loss="ipo", label_smoothing=0.1), "ipo.*no label smoothing"),
    ],
)
def test_dpo_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        dpo_config("smoke", **overrides)
    with pytest.raises(ValueError, match="unknown config key"):
        dpo_config("smoke", learning_rate=1e-3)


def test_one_registry_of_preference_losses():
    assert PREFERENCE_LOSSES == {"dpo": dpo_loss, "cdpo": dpo_loss, "ipo": ipo_loss}
    assert dpo_config("smoke", loss="cdpo", label_smoothing=0.1).loss == "cdpo"


def test_dpo_run_folders_are_keyed_by_the_training_config():
    base = dpo_dir(dpo_config("smoke"))
    assert dpo_dir(dpo_config("smoke", device="cpu", ckpt_interval=2, eval_interval=1)) == base  # bookkeeping only
    assert len({base, dpo_dir(dpo_config("smoke", lr=2e-4)), dpo_dir(dpo_config("smoke", loss="ipo"))}) == 3
    assert base.name.endswith(f"_sft-{sft_config('smoke').digest()}")  # and by the SFT run it starts from


def test_train_dpo_saves_the_policy_that_load_dpo_models_returns():
    result = train_dpo(dpo_config("smoke", device="cpu"))
    policy, reference, tokenizer, beta = load_dpo_models("smoke")
    assert beta == result.config.beta and not policy.training
    ids = torch.tensor([tokenizer.encode("Human: Hi\n\nAssistant: Hello")])
    torch.testing.assert_close(policy(ids).logits, result.model(ids).logits)
    torch.testing.assert_close(reference(ids).logits, result.reference(ids).logits)
    assert not torch.equal(policy(ids).logits, reference(ids).logits)  # the saved model is the trained policy


# ---------------------------------------------------------------------------------------------- policy evaluation
def three_token_lm(seed: int) -> GPT2LMHeadModel:
    """A random LM over a 3-token vocabulary, peaked enough that two of them have a clearly nonzero KL."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=3, n_positions=8, n_embd=8, n_layer=1, n_head=1,
                                      initializer_range=1.0)).eval()


def test_kl_estimate_on_own_samples_matches_the_exact_kl():
    from fm.generate import Completions, generate

    policy, reference = three_token_lm(0), three_token_lm(1)
    prompt = [0, 2]
    replies = [[a, b] for a in range(3) for b in range(3)]  # every reply of length 2: the whole reply space
    space = Completions(["x"] * 9, ["y"] * 9, [prompt] * 9, replies)
    p, q = completion_logps(policy, space, 0).double(), completion_logps(reference, space, 0).double()
    assert p.exp().sum().item() == pytest.approx(1.0, abs=1e-5)  # the enumeration is complete
    exact = (p.exp() * (p - q)).sum().item()

    n = 4000
    samples = generate(policy, torch.tensor([prompt] * n), 2, generator=torch.Generator().manual_seed(0))[:, 2:]
    drawn = Completions(["x"] * n, ["y"] * n, [prompt] * n, samples.tolist())
    ev = PolicyEval("policy", drawn, torch.zeros(n), completion_logps(policy, drawn, 0, batch_size=1000),
                    completion_logps(reference, drawn, 0, batch_size=1000))
    summary = ev.summary()
    assert exact > 0.05  # the two models really differ
    assert abs(summary["kl"] - exact) < 3 * summary["kl_se"], (summary["kl"], exact, summary["kl_se"])


def test_evaluate_policy_scores_samples_and_the_reference_has_zero_kl():
    from fm.pretrained import load_lm

    reference, tok = load_lm("tiny")
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = ["Human: Hi!\n\nAssistant:", "Human: How was your day?\n\nAssistant:", "Human: Any plans?\n\nAssistant:"]
    sft = evaluate_policy("SFT", reference, reference, tok, prompts, max_new_tokens=8, seed=0)
    dpo = evaluate_policy("DPO", policy, reference, tok, prompts, max_new_tokens=8, seed=0)
    assert sft.log_ratios.abs().max() == 0 and sft.summary()["kl"] == 0
    assert torch.equal(sft.rewards, sentiment_reward(sft.completions.replies))
    torch.testing.assert_close(dpo.ref_logps, completion_logps(reference, dpo.completions, tok.eos_token_id))
    rows = compare_to_baseline([sft, dpo], sft)
    assert rows[0]["win_rate"] == 0.5 and rows[0]["win_ci_low"] == rows[0]["win_ci_high"] == 0.5
    assert {"reward", "kl", "mean_words", "distinct_2", "ref_logp_per_token"} <= set(rows[1])
    summary = dpo_summary("sentiment", 16, sft, dpo, [frontier_point("dpo", 0.1, dpo)], 0.6, 10)
    assert tuple(summary) == SUMMARY_KEYS and summary["source"] == "oracle-sentiment"
    assert summary["n_eval_prompts"] == 3 and summary["frontier"][0]["kl"] == pytest.approx(dpo.log_ratios.mean())
    low, high = summary["win_rate_ci"]
    assert low <= summary["win_rate"] <= high
    with pytest.raises(ValueError, match="needs the policy's tokenizer"):
        evaluate_policy("DPO", policy, reference, None, prompts, 8)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        evaluate_policy("DPO", policy, reference, tok, [], 8)


def test_ipo_length_normalize_divides_each_log_ratio_by_the_completion_tokens():
    batch = random_batch()
    policy = tiny_lm()
    chosen, rejected = concatenated_logps(policy, batch)
    ref_c, ref_r = chosen.detach() - 1.0, rejected.detach() + 2.0
    batch = {**batch, "reference_chosen_logps": ref_c, "reference_rejected_logps": ref_r}
    tokens = batch["loss_mask"][:, 1:].sum(-1).float()
    n_c, n_r = tokens[:3], tokens[3:]
    loss, metrics = make_preference_loss_fn(0.5, loss=ipo_loss, length_normalize=True)(policy, batch)
    expected, _, _ = ipo_loss(chosen / n_c, rejected / n_r, ref_c / n_c, ref_r / n_r, beta=0.5)
    torch.testing.assert_close(loss, expected.mean())
    summed, _ = make_preference_loss_fn(0.5, loss=ipo_loss)(policy, batch)
    torch.testing.assert_close(summed, ipo_loss(chosen, rejected, ref_c, ref_r, beta=0.5)[0].mean())
    assert not torch.isclose(loss, summed)
    torch.testing.assert_close(metrics["logps/chosen"], chosen.detach().mean())  # logged: the summed log-probs


def test_sentiment_source_config():
    assert dpo_config("smoke", data_source="sentiment", sampled_pairs=8).sampled_pairs == 8
    with pytest.raises(ValueError, match="sampled_pairs must be positive"):
        dpo_config("smoke", sampled_pairs=0)
    with pytest.raises(ValueError, match="sampled_pairs .* must cover one batch"):
        dpo_config("smoke", sampled_pairs=1)
    with pytest.raises(ValueError, match="length_normalize is an IPO option"):
        dpo_config("smoke", length_normalize=True)
    assert dpo_config("smoke", loss="ipo", length_normalize=True).length_normalize
    base = dpo_config("smoke")
    assert dpo_dir(dpo_config("smoke", eval_prompts=7)) == dpo_dir(base)  # evaluation only
    assert dpo_dir(dpo_config("smoke", tie_margin=0.3)) != dpo_dir(base)  # other pairs


def test_dpo_summary_file_keeps_the_other_notebooks_frontier_points(tmp_path):
    from fm.dpo_analysis import write_dpo_summary

    def summary(points, source="oracle-sentiment"):
        return {"source": source, "n_eval_prompts": 200, "win_rate": 0.7, "frontier": points}

    path = tmp_path / "dpo_summary.json"
    dpo = {"method": "dpo", "beta": 0.1, "seed": 0, "kl": 4.0, "reward": 0.7}
    dpo_seed1 = {**dpo, "seed": 1, "kl": 3.0}
    ipo = {"method": "ipo", "beta": 0.1, "seed": 0, "kl": 3.0, "reward": 0.6}
    write_dpo_summary(path, summary([dpo, dpo_seed1, ipo]))  # 1.4: every point
    out = write_dpo_summary(path, summary([{**dpo, "kl": 4.5}]))  # 1.3 rerun: its own point replaces its old one
    assert out["frontier"] == [{**dpo, "kl": 4.5}, dpo_seed1, ipo]  # the other seed's point is another point
    assert json.loads(path.read_text())["frontier"] == out["frontier"]
    assert write_dpo_summary(path, summary([dpo], source="hh-rlhf"))["frontier"] == [dpo]  # other data: start over


def _policy_eval(name, replies, rewards=None):
    from fm.dpo_analysis import PolicyEval
    from fm.generate import Completions
    from fm.reward import sentiment_reward

    n = len(replies)
    completions = Completions(prompts=[f"p{i}" for i in range(n)], replies=list(replies), prompt_ids=[[1]] * n,
                              completion_ids=[[2]] * n)
    rewards = sentiment_reward(replies) if rewards is None else torch.tensor(rewards)
    return PolicyEval(name, completions, rewards, torch.zeros(n), torch.zeros(n))


def test_length_controlled_win_rate_cuts_both_replies_to_the_shorter():
    from fm.dpo_analysis import length_controlled_win_rate
    from fm.metrics import win_rate

    # the policy wins every prompt only through a positive tail that the baseline's shorter reply has no room for
    policy = _policy_eval("long", ["the bus was late again today, love it great", "I ate soup wonderful amazing"])
    baseline = _policy_eval("short", ["the bus was late again today", "I ate soup"])
    assert win_rate(policy.rewards, baseline.rewards)[0] == 1.0
    assert length_controlled_win_rate(policy, baseline) == (0.5, 0.5, 0.5)  # equal text after the cut: all ties
    better = _policy_eval("better", ["the bus was great again today", "I ate soup"])
    assert length_controlled_win_rate(better, baseline)[0] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="different prompts"):
        length_controlled_win_rate(policy, _policy_eval("x", ["a", "b", "c"]))


def test_frontier_point_and_summary_carry_seeds_and_intervals():
    from fm.dpo_analysis import SUMMARY_KEYS, dpo_summary, frontier_point

    sft = _policy_eval("SFT", ["ok", "fine", "sure", "no"])
    dpo = _policy_eval("DPO", ["great", "fine", "love it", "no"])
    dpo.logps = torch.tensor([1.0, 2.0, 3.0, 2.0])
    point = frontier_point("dpo", 0.1, dpo, seed=3)
    assert point["seed"] == 3 and point["n_prompts"] == 4 and point["kl"] == pytest.approx(2.0)
    assert point["kl_ci"][0] < 2.0 < point["kl_ci"][1]
    assert point["reward_ci"][0] < point["reward"] < point["reward_ci"][1]
    summary = dpo_summary("sentiment", 16, sft, dpo, [point], val_reward_accuracy=0.75, n_val_pairs=40)
    assert set(summary) == set(SUMMARY_KEYS)
    low, high = summary["val_reward_accuracy_ci"]
    assert 0.5 < low < 0.75 < high < 1  # Wilson interval of 30 / 40
    assert summary["length_controlled_win_rate_ci"][0] <= summary["length_controlled_win_rate"]
