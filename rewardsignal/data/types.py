"""The common datum form every example shape is converted to."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Datum:
    """One training sequence.

    ``target_ids[i]`` is the token predicted at position ``i`` (from
    ``input_ids[: i + 1]``) and ``weights[i]`` its loss weight (0 masks it out;
    real-valued, possibly negative). ``logprobs`` / ``advantages`` are the
    per-target sampling logprobs and advantages RL losses need.
    """

    input_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    weights: tuple[float, ...]
    extra: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for w in self.weights if w != 0)

    def to_json(self) -> dict:
        return {
            "model_input": list(self.input_ids),
            "loss_fn_inputs": {
                "target_tokens": list(self.target_ids), "weights": list(self.weights),
                **{k: list(v) for k, v in self.extra.items()},
            },
        }
