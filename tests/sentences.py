"""Varied English sentences for transformer calibration and validation, generated from
templates (several hundred, deterministic), tokenized for MiniLM and grouped into batches
of equal length (no padding, so every token counts in activation statistics)."""

from __future__ import annotations

import itertools

import numpy as np

SUBJECTS = ("The teacher", "My neighbour", "A young engineer", "The old fisherman",
            "Our manager", "The scientist", "Her brother", "The committee", "A tourist",
            "The mayor", "The little girl", "The chef", "A journalist", "The pilot")
VERBS = ("explained", "painted", "discovered", "repaired", "described", "ordered",
         "cancelled", "recommended", "photographed", "criticized", "celebrated", "studied")
OBJECTS = ("the broken bicycle", "a new theory about stars", "the quarterly budget",
           "an ancient map of the city", "the noisy washing machine", "a recipe for bread",
           "the results of the election", "a song about the sea", "the train timetable",
           "the price of electricity", "a painting of the mountains", "the missing keys")
ENDINGS = ("yesterday.", "before lunch.", "with great care.", "in front of everyone.",
           "for the third time this week.", "despite the rain.", "?", "last summer.",
           "without saying a word.", "at the end of the meeting.")
QUESTIONS = ("How do I {v} {o}?", "Why did {s} {v} {o}?", "Where can I find {o}?",
             "Is it true that {s} {v} {o}?")


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct sentences (statements and questions), shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    pool = [f"{s} {v} {o} {e}".replace(" ?", "?") for s, v, o, e in
            itertools.product(SUBJECTS, VERBS, OBJECTS, ENDINGS)]
    bare = [v.rstrip("ed") if v.endswith("ed") else v for v in VERBS]
    pool += [q.format(s=s.lower(), v=v, o=o) for q, s, v, o in
             itertools.product(QUESTIONS, SUBJECTS[:4], bare, OBJECTS)]
    picked = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return [pool[i] for i in picked]


def minilm_batches(texts: list[str], batch: int = 32) -> list[dict[str, np.ndarray]]:
    """MiniLM feeds for ``texts``: sentences of equal token length batched together."""
    from tests import zoo

    by_length: dict[int, list[dict]] = {}
    for text in texts:
        feeds = zoo.minilm_tokenize((text,))
        by_length.setdefault(feeds["input_ids"].shape[1], []).append(feeds)
    out = []
    for _, group in sorted(by_length.items()):
        for i in range(0, len(group), batch):
            chunk = group[i:i + batch]
            out.append({k: np.concatenate([f[k] for f in chunk]) for k in chunk[0]})
    return out
