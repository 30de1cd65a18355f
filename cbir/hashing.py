"""Content hashes: how files are identified (weights files, and images in a database)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    with open(path, "rb") as f:
        return stream_sha256(f)


def stream_sha256(f: IO[bytes]) -> str:
    """Hex SHA-256 of what is left to read in an open file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def image_id_of(sha256_hex: str) -> int:
    """A database image id: the first 8 bytes of the content's SHA-256 as a signed int64."""
    return int.from_bytes(bytes.fromhex(sha256_hex[:16]), "big", signed=True)
