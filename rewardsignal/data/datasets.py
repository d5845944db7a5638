"""JSONL datasets: streaming, line-numbered errors, the shipped sample set."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rewardsignal.data.examples import example_to_datum
from rewardsignal.data.types import Datum
from rewardsignal.errors import DataError

SAMPLE_DATASET = Path(__file__).parent / "samples" / "chat.jsonl"


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line, one at a time."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {str(path)!r} does not exist")
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name} line {lineno}: invalid JSON ({exc.msg} at "
                                f"column {exc.colno})") from None


def load_examples(path: str | Path) -> list[Any]:
    return [obj for _, obj in iter_jsonl(path)]


def iter_datums(path: str | Path, tokenizer, *, max_length: int | None = None
                ) -> Iterator[Datum]:
    name = Path(path).name
    for lineno, obj in iter_jsonl(path):
        yield example_to_datum(obj, tokenizer, max_length=max_length,
                               where=f"{name} line {lineno}")


def sample_examples() -> list[dict]:
    """The shipped chat dataset (arithmetic and short facts) used by the demo."""
    return load_examples(SAMPLE_DATASET)
