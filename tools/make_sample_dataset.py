"""Regenerate rewardsignal/data/samples/chat.jsonl, the demo's chat dataset.

Deterministic: short arithmetic and fact questions written for Signal, so the
tiny built-in model has something small and regular to memorise.
"""

import json
import random
from pathlib import Path

FACTS = [
    ("What colour is the sky on a clear day?", "Blue."),
    ("How many days are in a week?", "Seven."),
    ("How many legs does a spider have?", "Eight."),
    ("What is the opposite of hot?", "Cold."),
    ("What do bees make?", "Honey."),
    ("What is frozen water called?", "Ice."),
    ("How many hours are in a day?", "Twenty-four."),
    ("What is the first letter of the alphabet?", "A."),
    ("Which planet do we live on?", "Earth."),
    ("What colour is grass?", "Green."),
    ("How many months are in a year?", "Twelve."),
    ("What is the opposite of up?", "Down."),
    ("What gas do plants take in?", "Carbon dioxide."),
    ("How many sides does a triangle have?", "Three."),
    ("How many sides does a square have?", "Four."),
    ("What is the boiling point of water in Celsius?", "100 degrees."),
    ("What is the freezing point of water in Celsius?", "0 degrees."),
    ("Which animal says moo?", "A cow."),
    ("Which animal barks?", "A dog."),
    ("What do you call a baby cat?", "A kitten."),
    ("What is the largest ocean?", "The Pacific."),
    ("What shines in the sky during the day?", "The Sun."),
    ("How many minutes are in an hour?", "Sixty."),
    ("What is the opposite of left?", "Right."),
    ("What colour are ripe bananas?", "Yellow."),
]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def main() -> None:
    rng = random.Random(7)
    rows = []
    for q, a in FACTS:
        rows.append({"messages": [{"role": "user", "content": q},
                                  {"role": "assistant", "content": a}]})
    for a in range(10):
        for b in range(10):
            rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                      {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]})
    for _ in range(80):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        rows.append({"messages": [
            {"role": "system", "content": "You are a careful calculator."},
            {"role": "user", "content": f"What is {a} times {b}?"},
            {"role": "assistant", "content": f"{a} x {b} = {a * b}."}]})
    for n in range(11):
        rows.append({"messages": [{"role": "user", "content": f"Spell the number {n}."},
                                  {"role": "assistant", "content": f"{NAMES[n]}."}]})
    for n in range(1, 40):
        rows.append({"messages": [{"role": "user", "content": f"What comes after {n}?"},
                                  {"role": "assistant", "content": f"{n + 1}."}]})
    rng.shuffle(rows)
    out = Path(__file__).resolve().parent.parent / "rewardsignal/data/samples/chat.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} examples to {out}")


if __name__ == "__main__":
    main()
