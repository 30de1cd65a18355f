"""The manifest, cbir-db.json: how a database was built, and its format version.

Every field is validated when read: the manifest is a file in the database folder, and a
wrong field must be named, never trusted (a repair acting on a forged `feature_dim` would
delete the data it cannot read).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from cbir.db.files import open_regular, write_atomic
from cbir.errors import DatabaseError

FORMAT_VERSION = 7  # 7: feature sums; 6: catalog keyed by matrix row; 5: 32 class probabilities;
# 4: one search matrix, paths only in the catalog (older: rebuild)
MANIFEST_NAME = "cbir-db.json"
LINK_MODES = ("copy", "hardlink", "symlink")
POOLINGS = ("gap", "gem")
RESIZES = ("bilinear", "bicubic")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # a backbone name: also used in messages
_PARTS = re.compile(r"[a-z0-9_+]{0,64}")  # engine / precision, e.g. "openvino+tensorflow"
_WEIGHTS = re.compile(r"imagenet|none|sha256:[0-9a-f]{64}")
MAX_FEATURE_DIM = 16384


@dataclass(frozen=True)
class Settings:
    """How a database was built; queries and writers must use the same ones."""

    backbone: str
    weights: str  # "imagenet", "none" or "sha256:<hex>"
    feature_dim: int
    top_k: int = 4
    pooling: str = "gap"
    link: str = "copy"
    engine: str = ""
    precision: str = ""
    resize: str = "bilinear"  # the filter of cbir.images.load_image features were computed with


@dataclass
class Manifest:
    settings: Settings
    created: str
    updated: str
    n_images: int = 0

    def to_json(self) -> str:
        data: dict[str, object] = {"format": "cbir-db", "format_version": FORMAT_VERSION}
        data.update(asdict(self.settings))
        data.update(created=self.created, updated=self.updated, n_images=self.n_images)
        return json.dumps(data, indent=2) + "\n"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(db_dir: Path) -> Manifest:
    """The database's manifest; DatabaseError naming the problem when there is none, it is
    damaged, of another format, or a field is invalid."""
    path = db_dir / MANIFEST_NAME
    if not db_dir.is_dir():
        what = "is a file, not a database folder" if db_dir.exists() else "does not exist"
        raise DatabaseError(
            f"no database at {db_dir}: it {what} (create one with 'cbir create-db')"
        )
    try:
        fd = open_regular(path)
        with open(fd, "rb") as f:
            raw = f.read(1 << 20)
        data = json.loads(raw)
    except FileNotFoundError:
        raise DatabaseError(
            f"{db_dir} is not a cbir database ({MANIFEST_NAME} is missing)"
        ) from None
    except (OSError, ValueError) as exc:
        raise DatabaseError(f"{path} is damaged ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != "cbir-db":
        raise DatabaseError(f"{path} is not a cbir database manifest")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise DatabaseError(
            f"{db_dir} has database format {version!r}, "
            + ("newer than this cbir understands: upgrade cbir" if newer else
               f"this cbir reads format {FORMAT_VERSION} only: rebuild it with "
               "'cbir create-db SOURCE_DIR NEW_DB_DIR'")
        )  # fmt: skip
    return _validated(path, data)


def _validated(path: Path, data: dict) -> Manifest:
    def bad(field: str, why: str) -> DatabaseError:
        value = json.dumps(data.get(field))[:60]
        return DatabaseError(f"{path} is damaged: {field} {value} {why}")

    values = {}
    for f in fields(Settings):
        if f.name not in data:
            if f.default is not MISSING:  # a field with a default may be absent
                values[f.name] = f.default
                continue
            raise DatabaseError(f"{path} is damaged (missing field {f.name!r})")
        values[f.name] = data[f.name]
    s = values
    checks = {
        "backbone": isinstance(s["backbone"], str) and bool(_NAME.fullmatch(s["backbone"])),
        "weights": isinstance(s["weights"], str) and bool(_WEIGHTS.fullmatch(s["weights"])),
        "feature_dim": _is_int(s["feature_dim"]) and 1 <= s["feature_dim"] <= MAX_FEATURE_DIM,
        "top_k": _is_int(s["top_k"]) and 1 <= s["top_k"] <= 1000,
        "pooling": s["pooling"] in POOLINGS,
        "link": s["link"] in LINK_MODES,
        "engine": isinstance(s["engine"], str) and bool(_PARTS.fullmatch(s["engine"])),
        "precision": isinstance(s["precision"], str) and bool(_PARTS.fullmatch(s["precision"])),
        "resize": s["resize"] in RESIZES,
    }
    for name, ok in checks.items():
        if not ok:
            raise bad(name, "is not a valid value; restore it (see 'cbir info' of a sound "
                            "database) or rebuild with create-db")  # fmt: skip
    from cbir.model import BACKBONES

    known = BACKBONES.get(s["backbone"])
    if known is not None and known.feature_dim != s["feature_dim"]:
        raise bad("feature_dim", f"does not match {s['backbone']} ({known.feature_dim}); "
                                 f"restore it to {known.feature_dim}")  # fmt: skip
    n_images = data.get("n_images", 0)
    if not _is_int(n_images) or n_images < 0:
        raise bad("n_images", "is not a count")
    created, updated = data.get("created", ""), data.get("updated", "")
    if not isinstance(created, str) or not isinstance(updated, str):
        raise bad("created", "is not a time")
    return Manifest(Settings(**values), created, updated, n_images)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def write_manifest(db_dir: Path, manifest: Manifest) -> None:
    write_atomic(db_dir / MANIFEST_NAME, lambda f: f.write(manifest.to_json().encode()))


def is_database(folder: Path) -> bool:
    """Whether `folder` holds a cbir manifest (of any format): never index such a folder."""
    return os.path.lexists(folder / MANIFEST_NAME)
