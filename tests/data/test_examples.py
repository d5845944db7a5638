import json

import pytest

from rewardsignal.data import (
    Datum,
    example_to_datum,
    examples_to_datums,
    iter_datums,
    sample_examples,
    shard_by_token_budget,
    split_by_shares,
)
from rewardsignal.errors import DataError


def _loss_text(tok, d: Datum) -> str:
    return tok.decode([t for t, w in zip(d.target_ids, d.weights, strict=True) if w])


def test_text_has_loss_on_every_token(tokenizer):
    d = example_to_datum({"text": "abc"}, tokenizer)
    assert d.input_ids == (tokenizer.bos_token_id, *tokenizer.encode("abc",
                                                                     add_special_tokens=False))
    assert d.target_ids[-1] == tokenizer.eos_token_id
    assert d.input_ids[1:] == d.target_ids[:-1]
    assert d.weights == (1.0,) * 4


def test_input_output_has_loss_on_output_only(tokenizer):
    d = example_to_datum({"input": "2+2=", "output": "4"}, tokenizer)
    assert _loss_text(tokenizer, d) == "4<|eos|>"
    assert d.num_loss_tokens == 2


@pytest.mark.parametrize("key", ["input", "output"])
def test_lone_input_or_output_is_text_to_learn(tokenizer, key):
    d = example_to_datum({key: "The quick brown fox."}, tokenizer)
    assert d == example_to_datum({"text": "The quick brown fox."}, tokenizer)
    assert d.weights == (1.0,) * len(d)


def test_prompt_completion_is_input_output(tokenizer):
    d = example_to_datum({"prompt": "2+2=", "completion": "4"}, tokenizer)
    assert d == example_to_datum({"input": "2+2=", "output": "4"}, tokenizer)
    assert _loss_text(tokenizer, d) == "4<|eos|>"


def test_messages_loss_on_assistant_turns_only(tokenizer):
    ex = {"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."},
                       {"role": "user", "content": "Bye"},
                       {"role": "assistant", "content": "Ciao."}]}
    d = example_to_datum(ex, tokenizer)
    assert _loss_text(tokenizer, d) == "Hello.<|im_end|>\nCiao.<|im_end|>\n"
    full = tokenizer.apply_chat_template(ex["messages"], tokenize=False)
    assert tokenizer.decode(list(d.input_ids[1:]) + [d.target_ids[-1]]) == full


def test_tinker_datum_used_as_given(tokenizer):
    ex = {"model_input": {"chunks": [{"tokens": [5, 6]}, {"tokens": [7]}]},
          "loss_fn_inputs": {"target_tokens": [6, 7, 8], "weights": [0, 1, -0.5],
                             "advantages": [0.1, 0.2, 0.3], "logprobs": [-1, -2, -3]}}
    d = example_to_datum(ex, tokenizer)
    assert d.input_ids == (5, 6, 7) and d.target_ids == (6, 7, 8)
    assert d.weights == (0.0, 1.0, -0.5)
    assert d.extra["advantages"] == (0.1, 0.2, 0.3)
    assert example_to_datum(d.to_json(), tokenizer) == d


@pytest.mark.parametrize("example, match", [
    ({"txt": "a"}, r"unrecognised example.*\['txt'\]"),
    ({"text": 3}, "field 'text' must be a string"),
    ({"text": ""}, "field 'text' is empty"),
    ({"text": "a", "extra": 1}, r"unknown field\(s\) \['extra'\]"),
    ({"prompt": "a"}, "missing field 'completion'"),
    ({"completion": "a"}, "missing field 'prompt'"),
    ({"output": 3}, "field 'output' must be a string"),
    ({"input": "a", "text": "b"}, r"unknown field\(s\) \['input'\]"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     r"messages\[1\].content: assistant turn is empty"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, r"messages\[0\].role must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, r"messages\[0\].content must be a string"),
    ({"model_input": [1, 2], "loss_fn_inputs": {"target_tokens": [2]}}, "must match"),
    ({"model_input": [1, 99999], "loss_fn_inputs": {"target_tokens": [2, 3]}},
     "outside the vocabulary"),
    ({"model_input": [1, "a"], "loss_fn_inputs": {"target_tokens": [2, 3]}},
     r"model_input\[1\] must be an integer"),
    ({"model_input": [1, 2], "loss_fn_inputs": {"target_tokens": [2, 3], "weights": [1, "x"]}},
     r"weights\[1\] must be a finite number"),
    ({"model_input": [1, 2], "loss_fn_inputs": {"target_tokens": [2, 3], "weights": [1]}},
     "has length 1, expected 2"),
    ({"model_input": [1], "loss_fn_inputs": {"target_tokens": [2], "bogus": [1]}},
     "unknown field"),
    ("just a string", "must be an object"),
])
def test_bad_examples_name_the_field(tokenizer, example, match):
    with pytest.raises(DataError, match=match):
        examples_to_datums([{"text": "fine"}, example], tokenizer)
    with pytest.raises(DataError, match=r"^batch\[1\]"):
        examples_to_datums([{"text": "fine"}, example], tokenizer)


def test_truncation_and_over_long_prompt(tokenizer):
    d = example_to_datum({"text": "x" * 100}, tokenizer, max_length=16)
    assert len(d) == 16 and len(d.target_ids) == 16 and len(d.weights) == 16
    with pytest.raises(DataError, match="no token carries loss after truncation to 8"):
        example_to_datum({"input": "y" * 50, "output": "z"}, tokenizer, max_length=8)


def test_jsonl_errors_carry_line_numbers(tmp_path, tokenizer):
    p = tmp_path / "data.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n\n" + json.dumps({"text": 1}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl line 3: field 'text' must be a string"):
        list(iter_datums(p, tokenizer))
    p.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"data.jsonl line 2: invalid JSON"):
        list(iter_datums(p, tokenizer))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_datums(tmp_path / "missing.jsonl", tokenizer))


def test_sample_dataset_is_valid_and_sizeable(tokenizer):
    examples = sample_examples()
    assert 200 <= len(examples) <= 1000
    datums = examples_to_datums(examples, tokenizer)
    assert all(d.num_loss_tokens > 0 for d in datums)


def _datums(lengths):
    return [Datum(tuple(range(n)), tuple(range(n)), (1.0,) * n) for n in lengths]


def test_shard_by_token_budget_packs_in_order():
    ds = _datums([3, 4, 2, 6, 1, 9])
    shards = shard_by_token_budget(ds, 7)
    assert shards == [[0, 1], [2], [3, 4], [5]]  # the 9-token datum stands alone
    assert [i for s in shards for i in s] == list(range(6))
    for s in shards:
        assert len(s) == 1 or sum(len(ds[i]) for i in s) <= 7


def test_split_by_shares_follows_throughput():
    ds = _datums([10] * 12)
    parts = split_by_shares(ds, [3.0, 1.0])
    assert [len(p) for p in parts] == [9, 3]
    assert [i for p in parts for i in p] == list(range(12))
    assert split_by_shares(_datums([5]), [1.0, 1.0, 1.0]) == [[0]]


def test_text_is_encoded_as_the_tokenizer_applies_itself(tokenizer):
    from rewardsignal.data.examples import encode_text, special_prefix

    assert special_prefix(tokenizer) == [tokenizer.bos_token_id]
    assert encode_text(tokenizer, "2+2=") == tokenizer("2+2=")["input_ids"]
    d = example_to_datum({"text": "2+2=4"}, tokenizer)
    assert list(d.input_ids) == tokenizer("2+2=4")["input_ids"]


def test_a_tokenizer_that_adds_no_bos_gets_none(tiny_path):
    from transformers import AutoTokenizer

    from rewardsignal.data.examples import encode_text, special_prefix

    plain = AutoTokenizer.from_pretrained(tiny_path)
    plain.backend_tokenizer.post_processor = None  # like Qwen's or GPT-2's: no BOS added
    assert plain("hi")["input_ids"] == plain.encode("hi", add_special_tokens=False)
    assert special_prefix(plain) == []
    assert encode_text(plain, "hi") == plain("hi")["input_ids"]
    d = example_to_datum({"input": "2+2=", "output": "4"}, plain)
    assert d.input_ids[0] != plain.bos_token_id
