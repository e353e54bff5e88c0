import pytest

from fm.data import IGNORE_INDEX
from fm.preference import (
    KINDS,
    brush_offs,
    chitchat_pairs,
    collate_pairs,
    is_scored,
    load_preference_pairs,
    split_hh_row,
    tokenize_pair,
    tokenize_response,
)
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
    with pytest.raises(ValueError, match="unknown preference source"):
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
