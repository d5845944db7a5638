"""``run.evaluate``: held-out loss over a dataset sent in chunks, with errors
traced back to the file's 1-based line."""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from rewardsignal.data.datasets import iter_jsonl
from rewardsignal.errors import DataError, ValidationError

_AT = re.compile(r"^batch\[(\d+)\]")


def _examples(data: str | Path | Sequence[Any]) -> tuple[list[Any], list[str]]:
    """The examples and, for each, where it came from (``file line N``)."""
    if isinstance(data, str | Path):
        lines = list(iter_jsonl(data))
        name = Path(data).name
        return [obj for _, obj in lines], [f"{name} line {n}" for n, _ in lines]
    if not isinstance(data, list | tuple):
        raise ValidationError("evaluate takes a JSONL path or a list of examples")
    return list(data), [f"batch[{i}]" for i in range(len(data))]


async def evaluate_examples(call: Callable[[list, int | None], Awaitable[dict]],
                            data: str | Path | Sequence[Any], *, version: int | None,
                            batch_size: int) -> dict:
    """Sum loss and weight over chunks of ``batch_size`` examples, all at one
    version (the first chunk's, when none is given)."""
    examples, where = _examples(data)
    if not examples:
        raise ValidationError("evaluate needs at least one example")
    if batch_size < 1:
        raise ValidationError(f"batch_size must be >= 1, got {batch_size}")
    loss_sum = weight_sum = 0.0
    tokens = 0
    for start in range(0, len(examples), batch_size):
        try:
            res = await call(examples[start:start + batch_size], version)
        except ValidationError as exc:
            m = _AT.match(exc.message)
            if m is None:
                raise
            raise DataError(where[start + int(m.group(1))] + exc.message[m.end():]) from None
        version = res["version"]
        loss_sum += res["loss_sum"]
        weight_sum += res["weight_sum"]
        tokens += res["num_tokens"]
    loss = loss_sum / weight_sum if weight_sum else 0.0
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "num_examples": len(examples), "num_tokens": tokens, "weight_sum": weight_sum,
            "version": version}
