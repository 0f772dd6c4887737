"""Regenerate the bundled quickstart dataset (alpaca format) deterministically.

Writes ``examples/data/quickstart.jsonl`` and its package copy
``src/streamtune/assets/quickstart.jsonl`` (the tiny tokenizer is trained on the latter).
Run from the repository root: ``python examples/data/make_quickstart.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
RECORDS_PER_TASK = 60

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Turkey", "Ankara"),
    ("Russia", "Moscow"), ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Australia", "Canberra"), ("Thailand", "Bangkok"),
]
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("high", "low"), ("old", "new"),
    ("hard", "soft"), ("long", "short"), ("up", "down"), ("wet", "dry"), ("strong", "weak"),
    ("rich", "poor"), ("loud", "quiet"), ("thick", "thin"), ("near", "far"), ("clean", "dirty"),
]
WORDS = [
    "red", "blue", "green", "cat", "dog", "bird", "tree", "river", "stone", "cloud", "apple", "bread",
    "house", "road", "light", "music", "paper", "window", "garden", "summer", "winter", "moon", "sun",
    "ship", "train", "book", "chair", "lamp", "rain", "snow",
]
UNITS = [
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("liters", "milliliters", 1000),
    ("days", "hours", 24), ("weeks", "days", 7), ("feet", "inches", 12), ("dozens", "items", 12),
]


def arithmetic(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    if rng.random() < 0.5:
        return {"instruction": f"What is {a} + {b}?", "input": "", "output": f"{a} + {b} = {a + b}."}
    a, b = max(a, b), min(a, b)
    return {"instruction": f"What is {a} - {b}?", "input": "", "output": f"{a} - {b} = {a - b}."}


def reverse_words(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return {"instruction": "Reverse the order of the words.", "input": " ".join(words),
            "output": " ".join(reversed(words))}


def capital(rng: random.Random) -> dict[str, str]:
    country, city = rng.choice(CAPITALS)
    return {"instruction": f"What is the capital of {country}?", "input": "",
            "output": f"The capital of {country} is {city}."}


def convert(rng: random.Random) -> dict[str, str]:
    big, small, factor = rng.choice(UNITS)
    amount = rng.randint(1, 12)
    return {"instruction": f"Convert {amount} {big} to {small}.", "input": "",
            "output": f"{amount} {big} is {amount * factor} {small}."}


def antonym(rng: random.Random) -> dict[str, str]:
    word, opposite = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return {"instruction": "Give the opposite of the word.", "input": word, "output": opposite}


def sort_numbers(rng: random.Random) -> dict[str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return {"instruction": "Sort the numbers from smallest to largest.",
            "input": ", ".join(map(str, numbers)), "output": ", ".join(map(str, sorted(numbers)))}


def uppercase(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(1, 3))
    return {"instruction": "Write the words in capital letters.", "input": " ".join(words),
            "output": " ".join(words).upper()}


def count_words(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 7))
    return {"instruction": "How many words are in the text?", "input": " ".join(words),
            "output": f"There are {len(words)} words."}


TASKS = [arithmetic, reverse_words, capital, convert, antonym, sort_numbers, uppercase, count_words]


def make_records(seed: int = SEED, per_task: int = RECORDS_PER_TASK) -> list[dict[str, str]]:
    """``per_task`` records of every task, interleaved in a seeded order."""
    rng = random.Random(seed)
    records = [task(rng) for task in TASKS for _ in range(per_task)]
    rng.shuffle(records)
    return records


def render(records: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> None:
    root = Path(__file__).resolve().parents[2]
    text = render(make_records())
    for path in (root / "examples/data/quickstart.jsonl", root / "src/streamtune/assets/quickstart.jsonl"):
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({text.count(chr(10))} records)")


if __name__ == "__main__":
    main()
