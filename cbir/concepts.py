"""`cbir find`: images by concept ("dog", "fruit", "musical instrument") through WordNet.

ImageNet's 1000 classes are WordNet noun synsets. The package ships their words and
ancestors (cbir/data/class_hierarchy.json, built from WordNet 3.0 by
scripts/build_class_hierarchy.py), so a word matches every class it names or that descends
from a synset it names: "dog" matches 118 breeds. Images are ranked by the probability the
classifier gave the matching classes, from the 32 most probable the catalog keeps per image
(cbir.db.catalog.TOP_CLASSES).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from cbir import categories
from cbir.db import Database
from cbir.errors import CbirError
from cbir.query import Hit, hits


@dataclass(frozen=True)
class Concept:
    wnid: str  # the synset the words named (a class or an ancestor of classes)
    word: str  # its first word, e.g. "musical_instrument"


@dataclass(frozen=True)
class FindResult:
    words: str
    concepts: tuple[Concept, ...]  # the synsets the words matched
    classes: tuple[str, ...]  # the ImageNet classes under them, in output order
    hits: tuple[Hit, ...]  # score: the probability mass on those classes


@lru_cache(maxsize=1)
def _hierarchy() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(wnid -> its words, class wnid -> its ancestors)."""
    raw = json.loads(resources.files("cbir").joinpath("data/class_hierarchy.json").read_text())
    return raw["words"], raw["ancestors"]


@lru_cache(maxsize=1)
def _synsets_by_word() -> dict[str, list[str]]:
    """Lowercased word (underscores) -> the synsets it names, classes first."""
    words, _ = _hierarchy()
    found: dict[str, list[str]] = {}
    for wnid, names in words.items():
        for name in names:
            found.setdefault(_normal(name), []).append(wnid)
    return found


def _normal(text: str) -> str:
    return re.sub(r"[\s_-]+", "_", text.strip()).lower()


def _lookup(word: str) -> list[str]:
    """Synsets a word names, trying its singular for plurals ("dogs", "boxes", "berries")."""
    index = _synsets_by_word()
    candidates = [word]  # "oranges" -> "orange" before "orang" (an orangutan)
    if word.endswith("ies"):
        candidates.append(word[:-3] + "y")
    if word.endswith("s"):
        candidates.append(word[:-1])
    if word.endswith("es"):
        candidates.append(word[:-2])
    for candidate in candidates:
        if candidate in index:
            return index[candidate]
    return []


def match(words: list[str]) -> tuple[list[Concept], list[str]]:
    """(concepts matched, the classes under them). The words are one phrase if WordNet has it
    ("musical instrument"), else each word is a concept of its own ("cat dog"). Raises
    CbirError naming the closest known words when one matches nothing."""
    phrase = _normal(" ".join(words))
    synsets = _lookup(phrase)
    if not synsets:
        synsets = []
        for word in words:
            found = _lookup(_normal(word))
            if not found:
                known = list(_synsets_by_word())
                close = (len(words) > 1 and difflib.get_close_matches(phrase, known, 3, 0.8)) or \
                    difflib.get_close_matches(_normal(word), known, 3, 0.6)
                hint = f"; did you mean {', '.join(c.replace('_', ' ') for c in close)}?" \
                    if close else " (try a more general word: animal, food, vehicle, tool)"
                raise CbirError(f"no ImageNet class or WordNet concept is called {word!r}{hint}")
            synsets += found
    names, ancestors = _hierarchy()
    chosen = set(synsets)
    classes = [w for w in categories.wnids() if w in chosen or chosen & set(ancestors[w])]
    concepts = [Concept(s, names[s][0]) for s in dict.fromkeys(synsets)]
    return concepts, classes


def find(db: Database, words: list[str], n: int = 20) -> FindResult:
    """The n images with the most probability on the classes `words` match, best first."""
    concepts, classes = match(words)
    position = {w: i for i, w in enumerate(categories.wnids())}
    wanted = np.array([position[w] for w in classes], np.int64)
    ids, top, probs = db.catalog.class_probabilities()  # one streamed read
    mass = np.where(np.isin(top, wanted), probs, 0).sum(axis=1)
    held = np.flatnonzero(mass > 0)
    best = held[np.lexsort((ids[held], -mass[held]))][:n]
    found = hits(db, ids[best], mass[best].astype(np.float32))  # images removed since: left out
    return FindResult(" ".join(words), tuple(concepts), tuple(classes), tuple(found))
