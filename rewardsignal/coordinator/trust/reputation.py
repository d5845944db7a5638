"""A worker's reputation: how many of its results agreed with another worker's
recomputation since its last disagreement. A worker is on probation (every
result checked) until ``probation_tasks`` agreements in a row; after that its
results are sampled at the verification fraction; a disagreement resets it; a
worker found in the minority by a third worker is quarantined for good."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Reputation:
    worker_id: str
    token_id: str = ""      # the worker token it registered with ("" without tokens)
    streak: int = 0         # agreements since the last disagreement
    agreements: int = 0
    disagreements: int = 0
    verified: int = 0       # results of it that a verdict was reached on
    quarantined: bool = False
    reason: str = ""

    def state(self, probation_tasks: int) -> str:
        if self.quarantined:
            return "quarantined"
        return "probation" if self.streak < probation_tasks else "trusted"

    def agree(self) -> None:
        self.streak += 1
        self.agreements += 1
        self.verified += 1

    def disagree(self) -> None:
        self.streak = 0
        self.disagreements += 1
        self.verified += 1

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> Reputation:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__ if k in row})
