"""The capacity experiment's data, made here (no downloads), deterministic from a seed.

- **facts**: English-like text about made-up people, each with fixed facts (a city, a colour,
  a pet, an age, a friend), told in varied sentences. Predicting it well needs the grammar
  and, beyond it, the facts: capacity.
- **recall**: key -> value pairs over a small alphabet: ``k k k = v v ;`` items in random
  order; only the values are scored. Pure memory: nothing to generalise.

Both are byte/symbol-level token streams (``uint8``). ``describe`` gives their size and
SHA-256, printed by the experiment and written in the README.
"""

from __future__ import annotations

import hashlib

import numpy as np

SYLLABLES = [
    "ba",
    "be",
    "bo",
    "da",
    "de",
    "do",
    "fa",
    "fe",
    "ka",
    "ke",
    "ko",
    "la",
    "le",
    "lo",
    "ma",
    "me",
    "mo",
    "na",
    "ne",
    "no",
    "pa",
    "pe",
    "ra",
    "re",
    "ro",
    "sa",
    "se",
    "ta",
    "te",
    "to",
    "va",
    "ve",
    "za",
    "ze",
]
COLOURS = [
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "grey",
    "pink",
    "brown",
    "teal",
]
PETS = [
    "cat",
    "dog",
    "parrot",
    "hamster",
    "goat",
    "rabbit",
    "horse",
    "tortoise",
    "snake",
    "owl",
    "ferret",
    "llama",
]
TEMPLATES = (
    "{p} lives in {city}.",
    "{p}'s favourite colour is {colour}.",
    "{p} keeps a {pet}.",
    "{p} is {age} years old.",
    "{p} is a friend of {friend}.",
    "in {city} lives {p}, who keeps a {pet}.",
    "the {pet} of {p} is {colour}.",
    "{friend} met {p} in {city}.",
)


def _name(rng: np.random.Generator, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES, parts))


def facts(people: int = 3000, sentences: int = 120_000, seed: int = 0) -> np.ndarray:
    """The facts corpus as bytes [n] (uint8)."""
    rng = np.random.default_rng(seed)
    names = sorted({_name(rng, 3) for _ in range(people * 2)})[:people]
    cities = sorted({_name(rng, 2) for _ in range(400)})[:150]
    who = {
        p: {
            "city": rng.choice(cities),
            "colour": rng.choice(COLOURS),
            "pet": rng.choice(PETS),
            "age": int(rng.integers(18, 90)),
            "friend": names[int(rng.integers(people))],
        }
        for p in names
    }
    out = []
    for _ in range(sentences):
        p = names[int(rng.integers(people))]
        out.append(TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(p=p, **who[p]))
    return np.frombuffer(" ".join(out).encode(), np.uint8).copy()


RECALL_SYMBOLS = 32  # tokens 0..31 are symbols; then "=", ";"
EQ, SEP = RECALL_SYMBOLS, RECALL_SYMBOLS + 1


def recall_pairs(pairs: int = 8192, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(keys [pairs, 3], values [pairs, 2]) of symbols, keys distinct."""
    rng = np.random.default_rng(seed)
    codes = rng.choice(RECALL_SYMBOLS**3, pairs, replace=False)
    keys = np.stack([codes // RECALL_SYMBOLS**2, codes // RECALL_SYMBOLS % RECALL_SYMBOLS,
                     codes % RECALL_SYMBOLS], 1)  # fmt: skip
    return keys, rng.integers(0, RECALL_SYMBOLS, (pairs, 2))


def recall_stream(keys: np.ndarray, values: np.ndarray, items: int, seed: int):
    """``items`` random pairs as ``k k k = v v ;`` tokens [items * 7] (uint8), and a mask of
    the value tokens (the ones scored)."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(keys), items)
    tokens = np.concatenate(
        [keys[pick], np.full((items, 1), EQ), values[pick], np.full((items, 1), SEP)], 1
    )
    scored = np.zeros_like(tokens, dtype=bool)
    scored[:, 4:6] = True
    return tokens.reshape(-1).astype(np.uint8), scored.reshape(-1)


def describe(data: np.ndarray) -> str:
    return f"{data.nbytes / 2**20:.2f} MiB, sha256 {hashlib.sha256(data.tobytes()).hexdigest()}"
