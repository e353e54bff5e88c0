import pytest
import torch

from common.params import weights_digest
from fm.data import IGNORE_INDEX, load_dialogues
from fm.preference import (
    KINDS,
    brush_offs,
    chitchat_pairs,
    chitchat_prompts,
    collate_pairs,
    is_scored,
    label_pairs,
    load_preference_pairs,
    resolve_pair_source,
    sentiment_pairs,
    split_hh_row,
    tokenize_pair,
    tokenize_response,
)
from fm.reward import sentiment_reward
from fm.tokenizer import get_gpt2_tokenizer


@pytest.fixture(scope="module")
def fixture_pairs():
    return {split: chitchat_pairs(split, seed=0) for split in ("train", "validation")}


def test_fixture_is_deterministic_held_out_and_mixes_kinds(fixture_pairs):
    train, val = fixture_pairs["train"], fixture_pairs["validation"]
    assert len(train) > 1000 and len(val) > 50
    assert chitchat_pairs("validation", seed=0) == val
    assert chitchat_pairs("validation", seed=1) != val
    shared = {(p["prompt"], p["chosen"]) for p in val} & {(p["prompt"], p["chosen"]) for p in train}
    assert len(shared) <= 0.02 * len(val)  # other conversations (only stock greetings may repeat)
    for pairs in (train, val):
        assert {p["kind"] for p in pairs} == set(KINDS)
        for p in pairs:
            assert p["prompt"].startswith("Human: ") and p["prompt"].endswith("\n\nAssistant:")
            assert p["chosen"] != p["rejected"]


def test_fixture_kinds_show_the_preferred_behaviour(fixture_pairs):
    for split, pairs in fixture_pairs.items():
        for p in pairs:
            if p["kind"] == "rude":
                assert p["rejected"] in brush_offs(split)
            elif p["kind"] == "repetitive":
                words = p["rejected"].split()
                assert len(words) >= 6 and len(set(words)) <= 3 and words[0] == p["chosen"].split()[0]
            assert len(p["chosen"].split()) >= 4  # complete replies, not brush-offs
    assert not set(brush_offs("train")) & set(brush_offs("validation"))  # unseen rude phrasings in validation


def test_load_preference_pairs_limits_and_rejects_bad_arguments():
    pairs = load_preference_pairs("validation", source="chitchat", limit=20, seed=0)
    assert len(pairs) == 20 and pairs == load_preference_pairs("validation", source="chitchat", limit=20, seed=0)
    assert len({p["kind"] for p in pairs}) > 1  # the limit takes a shuffled sample, not one kind
    with pytest.raises(ValueError, match="split"):
        load_preference_pairs("test", source="chitchat")
    with pytest.raises(ValueError, match="unknown preference pairs source"):
        load_preference_pairs("train", source="imdb")
    with pytest.raises(ValueError, match="limit"):
        load_preference_pairs("train", source="chitchat", limit=0)


def test_split_hh_row():
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:"
    pair = split_hh_row(prompt + " Why did the chicken...", prompt + " No.")
    assert pair == {"prompt": prompt.strip(), "chosen": "Why did the chicken...", "rejected": "No.", "kind": "hh-rlhf"}
    assert split_hh_row("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: d") is None  # prompts differ
    assert split_hh_row(prompt + " same", prompt + " same") is None


def test_tokenize_pair_masks_exactly_the_responses():
    tok = get_gpt2_tokenizer()
    pair = {"prompt": "Human: How are you?\n\nAssistant:", "chosen": "Great, thanks!", "rejected": "Go away."}
    chosen, rejected = tokenize_pair(tok, pair, block_size=64)
    for ex, reply in ((chosen, pair["chosen"]), (rejected, pair["rejected"])):
        supervised = [t for t in ex["labels"] if t != IGNORE_INDEX]
        assert supervised == tok.encode(" " + reply) + [tok.eos_token_id]
        assert tok.decode(ex["input_ids"]) == pair["prompt"] + " " + reply + tok.eos_token
    assert tokenize_response(tok, pair["prompt"], pair["chosen"], 64) == chosen
    too_long = tokenize_response(tok, "Human: " + "x " * 80 + "\n\nAssistant:", "hi", 32)
    assert is_scored(chosen) and not is_scored(too_long)  # the prompt alone fills the block


def test_tokenize_pair_drops_old_turns_before_the_judged_reply():
    tok = get_gpt2_tokenizer()
    history = "Human: " + "blah " * 40 + "\n\nAssistant: " + "ok " * 40 + "\n\nHuman: Last question?\n\nAssistant:"
    chosen, rejected = tokenize_pair(tok, {"prompt": history, "chosen": "A kind answer.", "rejected": "No."}, 32)
    assert len(chosen["input_ids"]) <= 32 and tok.decode(chosen["input_ids"]).startswith("Human: Last question?")
    assert [t for t in rejected["labels"] if t != IGNORE_INDEX] == tok.encode(" No.") + [tok.eos_token_id]
    with pytest.raises(ValueError, match="must end with 'Assistant:'"):
        tokenize_pair(tok, {"prompt": "Human: hi", "chosen": "a", "rejected": "b"}, 32)


def test_collate_pairs_puts_chosen_rows_first():
    tok = get_gpt2_tokenizer()
    pairs = [{"prompt": f"Human: q{i}?\n\nAssistant:", "chosen": "good " * (i + 1), "rejected": "bad"}
             for i in range(3)]
    examples = [tokenize_pair(tok, pair, 64) for pair in pairs]
    batch = collate_pairs(examples, tok.eos_token_id)
    assert batch["input_ids"].shape[0] == 6 and set(batch) == {"input_ids", "attention_mask", "labels", "loss_mask"}
    for i, (chosen, rejected) in enumerate(examples):
        assert batch["input_ids"][i, : len(chosen["input_ids"])].tolist() == chosen["input_ids"]
        assert batch["input_ids"][3 + i, : len(rejected["input_ids"])].tolist() == rejected["input_ids"]
    assert (batch["loss_mask"] <= batch["attention_mask"]).all()  # padding is never scored
    assert batch["loss_mask"].sum(1).tolist() == [2, 3, 4, 2, 2, 2]  # " good" x (i+1) + EOS, " bad" + EOS


# ---------------------------------------------------------------------------------------------- on-policy pairs
def test_label_pairs_prefers_the_higher_reward_and_drops_near_ties():
    prompts = [f"Human: q{i}?\n\nAssistant:" for i in range(4)]
    a, b = ["great!", "ok", "sad", "fine"], ["meh", "ok then", "happy", "fine too"]
    pairs = label_pairs(prompts, a, b, torch.tensor([0.8, 0.0, -0.5, 0.30]), torch.tensor([0.1, 0.0, 0.6, 0.25]),
                        margin=0.1)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("great!", "meh"), ("happy", "sad")]  # tie, near-tie out
    assert [p["prompt"] for p in pairs] == [prompts[0], prompts[2]]
    assert all(p["chosen_reward"] > p["rejected_reward"] and p["kind"] == "sentiment" for p in pairs)
    assert len(label_pairs(prompts, a, b, torch.tensor([0.8, 0.0, -0.5, 0.3]), torch.tensor([0.1, 0.0, 0.6, 0.25]),
                           margin=0.0)) == 3  # only the exact tie goes
    with pytest.raises(ValueError, match="one reply and one reward per prompt"):
        label_pairs(prompts, a[:3], b, torch.zeros(4), torch.zeros(4), 0.1)
    with pytest.raises(ValueError, match="no prompts"):
        label_pairs([], [], [], torch.zeros(0), torch.zeros(0), 0.1)


def test_chitchat_prompts_are_single_turn_and_held_out():
    train, val, test = (chitchat_prompts(split) for split in ("train", "validation", "test"))
    assert len(train) > 10_000 and len(val) > 500 and len(test) > 500
    assert not set(test) & set(val) and not set(test) & set(train) and not set(val) & set(train)
    for p in test[:50]:
        assert p.startswith("Human: ") and p.endswith("\n\nAssistant:") and p.count("Human:") == 1
    assert chitchat_prompts("test") == test and chitchat_prompts("test", seed=1) != test
    with pytest.raises(ValueError, match="split"):
        chitchat_prompts("eval")


def test_chitchat_prompts_are_built_once_and_handed_out_as_new_lists(monkeypatch):
    import fm.preference as preference

    calls = []
    monkeypatch.setattr(preference, "load_dialogues", lambda *a: calls.append(a) or load_dialogues(*a))
    preference._human_messages.cache_clear()
    preference._shuffled_prompts.cache_clear()
    try:
        first = chitchat_prompts("test")
        built = len(calls)  # one per split's messages: test prompts leave out the train and validation messages
        first.append("changed by a caller")
        again = chitchat_prompts("test")
        assert len(calls) == built == 3 and again == first[:-1] and again is not first
        assert chitchat_prompts("test", seed=1) != again and len(calls) == built  # another shuffle of the same messages
    finally:  # the next test must not see messages built from this test's wrapper
        preference._human_messages.cache_clear()
        preference._shuffled_prompts.cache_clear()


@pytest.fixture
def tiny_policy():
    from fm.pretrained import load_lm

    return load_lm("tiny", device="cpu", verbose=False)


def test_sentiment_pairs_are_cached_and_resampled_for_another_policy(tiny_policy, tmp_path, monkeypatch):
    import fm.preference as preference

    monkeypatch.setenv("HW3_CACHE_DIR", str(tmp_path))
    model, tokenizer = tiny_policy
    settings = dict(max_new_tokens=12, margin=0.05, batch_size=8, seed=0)
    pairs = sentiment_pairs(model, tokenizer, "train", 3, **settings)
    assert len(pairs) == 3
    for p in pairs:
        assert p["chosen_reward"] - p["rejected_reward"] >= 0.05
        assert sentiment_reward([p["chosen"], p["rejected"]]).tolist() == pytest.approx(
            [p["chosen_reward"], p["rejected_reward"]])
    files = list((tmp_path / "preference_pairs").glob("*.json"))
    assert len(files) == 1

    def no_sampling(*args, **kwargs):
        raise AssertionError("a cached set of pairs was sampled again")

    with monkeypatch.context() as m:
        m.setattr(preference, "sample_completions", no_sampling)
        assert sentiment_pairs(model, tokenizer, "train", 3, **settings) == pairs  # from the cache
        assert sentiment_pairs(model, tokenizer, "train", 2, **settings) == pairs[:2]  # fewer: the first ones
    more = sentiment_pairs(model, tokenizer, "train", 6, **settings)  # more: the missing batches only
    assert more[:3] == pairs and len(more) == 6 and len(list((tmp_path / "preference_pairs").glob("*.json"))) == 1
    with torch.no_grad():  # another SFT model: the cache must not answer for it
        next(model.parameters()).add_(1e-3)
    sentiment_pairs(model, tokenizer, "train", 3, **settings)
    assert len(list((tmp_path / "preference_pairs").glob("*.json"))) == 2
    with pytest.raises(ValueError, match="needs the policy's tokenizer"):
        sentiment_pairs(model, None, "train", 3)
    with pytest.raises(ValueError, match="must be positive"):
        sentiment_pairs(model, tokenizer, "train", 0)


def test_weights_digest_sees_any_change(tiny_policy):
    model, _ = tiny_policy
    before = weights_digest(model)
    assert weights_digest(model) == before
    with torch.no_grad():
        list(model.parameters())[-1].view(-1)[0] += 1e-6
    assert weights_digest(model) != before


def test_auto_source_is_sentiment_offline(monkeypatch):
    import fm.data

    monkeypatch.setattr(fm.data, "hub_reachable", lambda: (False, "offline (test)"))
    assert resolve_pair_source("auto") == "sentiment"
    monkeypatch.setattr(fm.data, "hub_reachable", lambda: (True, "online (test)"))
    assert resolve_pair_source("auto") == "hh"
    assert resolve_pair_source("chitchat") == "chitchat"
    with pytest.raises(ValueError, match="sampled from a policy"):
        load_preference_pairs("train", source="sentiment")
