"""Natural English sentences found on every machine that runs Python: the docstrings of
the standard library (modules, classes, functions), split into sentences. Written by
people for people, varied in topic and length, unlike template-generated text: what a
transformer is calibrated and validated on when no data set can be downloaded.

Deterministic for a Python version: files in sorted order, a seeded shuffle, and
``split`` hands out disjoint sets (calibration, validation, test) drawn from different
modules so that no set shares a docstring with another.
"""

from __future__ import annotations

import ast
import functools
import re
import sysconfig
import zlib
from pathlib import Path

import numpy as np

_SENTENCE_END = re.compile(r"(?<=[a-z][.?!])\s+(?=[A-Z])")
_ALLOWED = re.compile(r"^[A-Z][A-Za-z ,.;:'()?!-]+[.?!]$")
_NOT_PROSE = ("e.g", "i.e", "etc", " cf", "www", "http", "XXX", "TODO")
MIN_WORDS, MAX_WORDS = 6, 30


@functools.lru_cache(maxsize=1)
def _by_module() -> dict[str, tuple[str, ...]]:
    """{module file: its prose sentences} over the standard library (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, tuple[str, ...]] = {}
    seen: set[str] = set()  # a sentence in several modules belongs to the first
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("test/", "idlelib/idle_test", "lib2to3/tests", "site-packages")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        found: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found += _prose(doc)
        found = [s for s in dict.fromkeys(found) if s not in seen]
        seen.update(found)
        if found:
            out[rel] = tuple(found)
    return out


def _prose(doc: str) -> list[str]:
    # Paragraphs of running text only: skip indented blocks (code, tables, lists).
    kept = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        if any(line.startswith((" ", "\t", "-", "*", ">>>", "..")) for line in lines[1:]):
            continue
        text = " ".join(line.strip() for line in lines)
        for sentence in _SENTENCE_END.split(text):
            words = sentence.split()
            if MIN_WORDS <= len(words) <= MAX_WORDS and _ALLOWED.match(sentence) and \
                    not any(t in sentence for t in _NOT_PROSE) and \
                    not any(w.isupper() and len(w) > 1 for w in words) and \
                    not any("_" in w or w.count(".") > 1 for w in words):
                kept.append(sentence)
    return kept


def split(*counts: int, seed: int = 0) -> list[list[str]]:
    """Disjoint lists of ``counts[i]`` sentences each, every list drawn from its own
    modules (a module's sentences go to one list only), shuffled by ``seed``."""
    modules = _by_module()
    names = sorted(modules, key=lambda m: zlib.crc32(f"{seed}:{m}".encode()))
    total = sum(counts)
    have = sum(len(modules[m]) for m in names)
    if have < total:
        raise ValueError(f"the standard library has {have} prose sentences, {total} asked")
    # Modules are dealt to the lists in turn (in proportion to what each still needs),
    # so every list spans many modules.
    pools: list[list[str]] = [[] for _ in counts]
    for m in names:
        need = [c - len(p) for c, p in zip(counts, pools)]
        if max(need) <= 0:
            break
        i = int(np.argmax(np.asarray(need) / np.maximum(counts, 1)))
        pools[i] += modules[m]
    rng = np.random.default_rng(seed)
    out = []
    for pool, count in zip(pools, counts):
        if len(pool) < count:
            raise ValueError("not enough sentences for every list")
        out.append([pool[i] for i in sorted(rng.choice(len(pool), count, replace=False))])
    return out
