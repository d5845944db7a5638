"""Examples -> token ids + loss weights; JSONL datasets; sharding."""

from rewardsignal.data.datasets import (
    SAMPLE_DATASET,
    iter_datums,
    iter_jsonl,
    load_examples,
    sample_examples,
)
from rewardsignal.data.examples import example_to_datum, examples_to_datums
from rewardsignal.data.sharding import shard_by_token_budget, split_by_shares
from rewardsignal.data.types import Datum

__all__ = [
    "SAMPLE_DATASET", "Datum", "example_to_datum", "examples_to_datums", "iter_datums",
    "iter_jsonl", "load_examples", "sample_examples", "shard_by_token_budget", "split_by_shares",
]
