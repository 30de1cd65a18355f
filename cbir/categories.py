"""ImageNet-1k categories: WordNet ids, readable names and their folder names.

The class index ships inside the package (Keras' `decode_predictions` would download it).
A category is always identified by its WordNet id (`wnid`, e.g. "n02123045"); two classes
share the name "crane", so folder names carry both: "n02012849_crane".
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def class_index() -> tuple[tuple[str, str], ...]:
    """(wnid, name) for each of the 1000 output units, in the models' output order."""
    text = resources.files("cbir").joinpath("data/imagenet_class_index.json").read_text()
    raw = json.loads(text)
    return tuple((raw[str(i)][0], raw[str(i)][1]) for i in range(len(raw)))


@lru_cache(maxsize=1)
def names_by_wnid() -> dict[str, str]:
    return dict(class_index())


def wnids() -> list[str]:
    """The 1000 WordNet ids in output order."""
    return [wnid for wnid, _ in class_index()]


@lru_cache(maxsize=1)
def index_by_wnid() -> dict[str, int]:
    """wnid -> its output index."""
    return {wnid: i for i, (wnid, _) in enumerate(class_index())}


def is_wnid(value: object) -> bool:
    """Whether `value` is one of the 1000 class ids (a database's files are untrusted)."""
    return isinstance(value, str) and value in names_by_wnid()


def folder_name(wnid: str) -> str:
    """The category's folder in a database: wnid plus a filesystem-safe name."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", names_by_wnid()[wnid]).strip("_")
    return f"{wnid}_{name}"


def wnid_of_folder(folder: str) -> str:
    return folder.split("_", 1)[0]


def find_wnids(text: str) -> list[str]:
    """The classes `text` names: a wnid, or a class name in any case, with spaces or
    underscores ("Egyptian cat"). Two classes share some names ("crane")."""
    if is_wnid(text):
        return [text]
    wanted = re.sub(r"[\s_]+", "_", text.strip()).lower()
    return [w for w, name in class_index() if name.lower() == wanted]
