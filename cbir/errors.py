"""Errors whose message is meant for the user: the CLI prints them as one line."""

from __future__ import annotations

from pathlib import Path


class CbirError(Exception):
    """A problem the user can fix; `str(exc)` says what happened and what to do."""


class BadImage(CbirError):
    """One input file that cannot be used as an image; indexing skips it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class ImageTooLarge(BadImage):
    """An image over the decompression-bomb limit; the message names the option to raise it."""

    def __init__(self, path: Path, pixels: int, limit: int) -> None:
        super().__init__(
            path,
            f"{pixels / 1e6:.0f} MP is over the {limit / 1e6:.0f} MP limit "
            "(possible decompression bomb; raise it with --max-megapixels)",
        )
        self.pixels, self.limit = pixels, limit


class WeightsMissing(CbirError):
    """Pretrained weights are not on this machine and could not be downloaded."""


class DatabaseError(CbirError):
    """The database is missing, damaged, or does not fit this request."""


class DatabaseLocked(DatabaseError):
    """Another cbir process is writing to the database."""
