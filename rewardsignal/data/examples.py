"""Example shapes -> ``Datum``: token ids, targets and per-token loss weights.

Accepted shapes (each error names the offending field):

- ``{"text": str}``: loss on every token;
- ``{"input": str, "output": str}`` (or ``{"prompt", "completion"}``): loss on
  the output only;
- ``{"input": str}`` alone or ``{"output": str}`` alone: text to learn, loss on
  every token (as ``{"text"}``; the hosted API's quickstart sends these);
- ``{"messages": [{"role", "content"}, ...]}``: rendered with the tokenizer's
  chat template, loss on assistant turns only;
- ``{"model_input": [ids] | {"chunks": [{"tokens": [ids]}]},
  "loss_fn_inputs": {"target_tokens", "weights"?, "logprobs"?, "advantages"?}}``
  (Tinker-style), used as given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rewardsignal.data.types import Datum
from rewardsignal.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
# id(tokenizer) -> (tokenizer, prefix): the tokenizer is kept so its id stays its own.
_PREFIXES: dict[int, tuple[Any, tuple[int, ...]]] = {}
_EXTRA_KEYS = ("logprobs", "advantages")
_SHAPES = ("'text', 'input'+'output' (or a lone 'input' or 'output'), 'prompt'+'completion', "
           "'messages', or 'model_input'+'loss_fn_inputs'")


def _fail(where: str, msg: str) -> DataError:
    return DataError(f"{where}: {msg}")


def _require_str(ex: dict, key: str, where: str, *, allow_empty: bool = False) -> str:
    if key not in ex:
        raise _fail(where, f"missing field {key!r}")
    value = ex[key]
    if not isinstance(value, str):
        raise _fail(where, f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _fail(where, f"field {key!r} is empty")
    return value


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before a text when applied the usual way
    (``tokenizer(text)``): BOS for Llama-style tokenizers, nothing for those that
    add none (Qwen, GPT-2). Text is encoded with exactly this prefix everywhere
    (training examples, sample prompts), so ids match what a user's own
    ``tokenizer(text)`` and ``generate`` see."""
    if tokenizer is None:
        return []
    cached = _PREFIXES.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return list(cached[1])
    plain = list(tokenizer.encode("a", add_special_tokens=False))
    full = list(tokenizer.encode("a"))
    prefix: list[int] = []
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            prefix = full[:i]
            break
    if len(_PREFIXES) > 64:
        _PREFIXES.clear()
    _PREFIXES[id(tokenizer)] = (tokenizer, tuple(prefix))
    return prefix


def encode_text(tokenizer, text: str) -> list[int]:
    """``text`` as ``tokenizer(text)`` gives it, without any suffix it adds."""
    return special_prefix(tokenizer) + _encode(tokenizer, text)


def _bos(tokenizer) -> list[int]:
    return special_prefix(tokenizer)


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _from_tokens(tokens: list[int], loss_mask: list[float]) -> Datum:
    """Shift a token sequence into (input, target) pairs; ``loss_mask[j]`` is the
    weight of predicting ``tokens[j]``."""
    return Datum(tuple(tokens[:-1]), tuple(tokens[1:]), tuple(float(w) for w in loss_mask[1:]))


def _render_messages(messages: Any, tokenizer, where: str) -> tuple[list[int], list[float]]:
    if not isinstance(messages, list) or not messages:
        raise _fail(where, "field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{at}.role must be one of {list(ROLES)}, got {role!r}")
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(f"{at}.content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{at}.content: assistant turn is empty")
        unknown = set(m) - {"role", "content", "name"}
        if unknown:
            raise DataError(f"{at} has unknown field(s) {sorted(unknown)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise _fail(where, "'messages' has no assistant turn to learn from")
    if getattr(tokenizer, "chat_template", None) is None:
        raise _fail(where, "the base model's tokenizer has no chat template; use 'text' "
                    "or 'input'/'output' examples instead")

    def render(upto: int, gen_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                             add_generation_prompt=gen_prompt)
        return _encode(tokenizer, text)

    # Render growing prefixes; the tokens an assistant turn adds (after its
    # generation header) carry loss. This needs the template to be
    # prefix-stable, which is checked rather than assumed.
    tokens: list[int] = []
    mask: list[float] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            header = render(i, True)
            if header[: len(tokens)] != tokens:
                raise _fail(where, "chat template is not prefix-stable; cannot mask turns")
            mask += [0.0] * (len(header) - len(tokens))
            tokens = header
        full = render(i + 1, False)
        if full[: len(tokens)] != tokens:
            raise _fail(where, "chat template is not prefix-stable; cannot mask turns")
        mask += [1.0 if m["role"] == "assistant" else 0.0] * (len(full) - len(tokens))
        tokens = full
    return _bos(tokenizer) + tokens, [0.0] * len(_bos(tokenizer)) + mask


def _int_list(value: Any, where: str, vocab_size: int | None) -> list[int]:
    if isinstance(value, dict) and "chunks" in value:
        chunks = value["chunks"]
        if not isinstance(chunks, list):
            raise DataError(f"{where}.chunks must be a list")
        out: list[int] = []
        for j, c in enumerate(chunks):
            if not isinstance(c, dict) or "tokens" not in c:
                raise DataError(f"{where}.chunks[{j}] must be an object with 'tokens'")
            out += _int_list(c["tokens"], f"{where}.chunks[{j}].tokens", vocab_size)
        return out
    if not isinstance(value, list):
        raise DataError(f"{where} must be a list of token ids")
    for j, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int):
            raise DataError(f"{where}[{j}] must be an integer token id, got {t!r}")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise DataError(f"{where}[{j}] = {t} is outside the vocabulary [0, {vocab_size})")
    return list(value)


def _float_list(value: Any, where: str, length: int) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise DataError(f"{where} must be a list of numbers")
    if len(value) != length:
        raise DataError(f"{where} has length {len(value)}, expected {length} (one per target)")
    out = []
    for j, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise DataError(f"{where}[{j}] must be a finite number, got {v!r}")
        out.append(float(v))
    return tuple(out)


def _from_tinker(ex: dict, where: str, vocab_size: int | None) -> Datum:
    inputs = _int_list(ex["model_input"], f"{where}: model_input", vocab_size)
    lfi = ex.get("loss_fn_inputs")
    if not isinstance(lfi, dict):
        raise _fail(where, "field 'loss_fn_inputs' must be an object with 'target_tokens'")
    if "target_tokens" not in lfi:
        raise _fail(where, "missing field 'loss_fn_inputs.target_tokens'")
    unknown = set(lfi) - {"target_tokens", "weights", *_EXTRA_KEYS}
    if unknown:
        raise _fail(where, f"unknown field(s) in loss_fn_inputs: {sorted(unknown)}")
    targets = _int_list(lfi["target_tokens"], f"{where}: loss_fn_inputs.target_tokens",
                        vocab_size)
    if not inputs:
        raise _fail(where, "model_input is empty")
    if len(targets) != len(inputs):
        raise _fail(where, f"loss_fn_inputs.target_tokens has length {len(targets)}, "
                    f"model_input has {len(inputs)}; they must match")
    n = len(inputs)
    weights = (_float_list(lfi["weights"], f"{where}: loss_fn_inputs.weights", n)
               if "weights" in lfi else (1.0,) * n)
    extra = {k: _float_list(lfi[k], f"{where}: loss_fn_inputs.{k}", n)
             for k in _EXTRA_KEYS if k in lfi}
    return Datum(tuple(inputs), tuple(targets), weights, extra)


def _truncate(d: Datum, max_length: int | None) -> Datum:
    if max_length is None or len(d) <= max_length:
        return d
    return Datum(d.input_ids[:max_length], d.target_ids[:max_length], d.weights[:max_length],
                 {k: v[:max_length] for k, v in d.extra.items()})


def _pair_keys(keys: set[str]) -> tuple[str, str] | None:
    """The (prompt, completion) field names of a two-part example, if it is one."""
    for first, second in (("input", "output"), ("prompt", "completion")):
        if first in keys and second in keys:
            return first, second
    if "completion" in keys or ("prompt" in keys and not keys & {"text", "input", "output"}):
        return "prompt", "completion"  # a missing half is named by _require_str
    return None


def _text_key(keys: set[str]) -> str | None:
    """The one field of a text-to-learn example: 'text', or a lone 'input' or 'output'."""
    for key in ("text", "input", "output"):
        if key in keys:
            return key
    return None


def example_to_datum(example: Any, tokenizer, *, max_length: int | None = None,
                     where: str = "example") -> Datum:
    """Convert one example of any accepted shape; raises ``DataError`` naming the
    field (``where`` prefixes it: ``"batch[3]"``, ``"data.jsonl line 12"``)."""
    if not isinstance(example, dict):
        raise _fail(where, f"must be an object with {_SHAPES}, got {type(example).__name__}")
    vocab_size = len(tokenizer) if tokenizer is not None else None
    keys = set(example)
    if "model_input" in keys:
        datum = _from_tinker(example, where, vocab_size)
        return _truncate(datum, max_length)
    if "messages" in keys:
        tokens, mask = _render_messages(example["messages"], tokenizer, where)
        extra = keys - {"messages"}
    elif pair := _pair_keys(keys):
        first, second = pair
        prompt = _bos(tokenizer) + _encode(tokenizer, _require_str(example, first, where,
                                                                    allow_empty=True))
        completion = _encode(tokenizer, _require_str(example, second, where)) + _eos(tokenizer)
        tokens, mask = prompt + completion, [0.0] * len(prompt) + [1.0] * len(completion)
        extra = keys - set(pair)
    elif text_key := _text_key(keys):
        # A lone "input" or "output" is text to learn, as the hosted API reads it.
        tokens = _bos(tokenizer) + _encode(tokenizer, _require_str(example, text_key, where))
        tokens += _eos(tokenizer)
        mask = [1.0] * len(tokens)
        extra = keys - {text_key}
    else:
        raise _fail(where, f"unrecognised example; expected {_SHAPES}, got fields "
                    f"{sorted(keys)}")
    if extra:
        raise _fail(where, f"unknown field(s) {sorted(extra)}")
    if len(tokens) < 2:
        raise _fail(where, "example is too short to train on (needs at least 2 tokens)")
    datum = _truncate(_from_tokens(tokens, mask), max_length)
    if datum.num_loss_tokens == 0:
        raise _fail(where, f"no token carries loss after truncation to {max_length} tokens; "
                    "shorten the prompt or raise max_length")
    return datum


def examples_to_datums(examples: Sequence[Any], tokenizer, *, max_length: int | None = None,
                       name: str = "batch") -> list[Datum]:
    if not isinstance(examples, list | tuple) or not examples:
        raise DataError(f"{name} must be a non-empty list of examples")
    return [example_to_datum(ex, tokenizer, max_length=max_length, where=f"{name}[{i}]")
            for i, ex in enumerate(examples)]
