"""A category folder's feature files, features.<lo>-<hi>.npz: the portable, per-folder record.

Each holds plain arrays (numpy.load(..., allow_pickle=False)): ids (r,) int64, files (r,) str
(the stored copies' names in this folder), probs (r,) float32 (the image's probability for
this category) and features (r, d) float16 (the rows of the search matrix). Source paths are
not kept here: they live in the catalog only, so that results never show a stale one.

A write of the category files adds a segment to every category it touches, numbered one past
the folder's highest, instead of rewriting the category: it costs its own rows. Segments are
merged by size class (`merge_tail`): MERGE_FANOUT segments of a class make one of the next, and
a segment of SEALED_BYTES or more is never merged again, so a row is rewritten a bounded number
of times however large its category grows (at most 3; a folder keeps its sealed segments and
a few of each class below). A merge of lo..hi is named after that range: a segment inside
another's range is a leftover of an interrupted merge, never read, and deleted by the next
writer. Queries do not read these files (they read the search matrix); check, repair and the
merges do, one folder at a time.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

from cbir.db.files import DAMAGE, Writing, damaged, load_npz, npz_writer, open_regular
from cbir.errors import DatabaseError

SEGMENT_NAME = re.compile(r"features\.(\d{1,12})-(\d{1,12})\.npz")
FEATURE_DTYPE = np.dtype("<f2")
READ_ATTEMPTS = 20  # listings of a folder a reader tries while a writer merges
FEATURE_BLOCK_ROWS = 512  # rows of a merged file's features in memory at a time
COLUMNS = ("ids", "files", "probs", "features")
MERGE_FANOUT = 8  # segments of one size class merged at a time
CLASS_BYTES = 2 << 10  # size class 0: segments below MERGE_FANOUT times this
SEALED_BYTES = 1 << 20  # never merged again: class 3 and up at the fan-out of 8 (400 rows of
# 1280 float16 features; a category of 40k rows keeps 12-100 files)


@dataclass(frozen=True)
class CategoryRows:
    """Rows of a category: ids (r,) int64, files (r,) str, probs (r,) float32,
    features (r, d) float16."""

    ids: npt.NDArray[np.int64]
    files: npt.NDArray[np.str_]
    probs: npt.NDArray[np.float32]
    features: npt.NDArray[np.float16]

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, mask: npt.NDArray[np.bool_]) -> CategoryRows:
        return CategoryRows(self.ids[mask], self.files[mask], self.probs[mask],
                            self.features[mask])  # fmt: skip

    def writer(self) -> Writing:
        return npz_writer(
            ids=self.ids.astype(np.int64),
            files=self.files.astype(np.str_),
            probs=self.probs.astype(np.float32),
            features=np.ascontiguousarray(self.features, FEATURE_DTYPE),
        )

    @classmethod
    def concatenate(cls, parts: list[CategoryRows], dim: int) -> CategoryRows:
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(0, "U1"), np.zeros(0, np.float32),
                       np.zeros((0, dim), FEATURE_DTYPE))  # fmt: skip
        return cls(*(np.concatenate([getattr(p, c) for p in parts]) for c in COLUMNS))


@dataclass(frozen=True)
class Segment:
    path: Path
    lo: int
    hi: int


def segments(folder: Path) -> tuple[list[Segment], list[Segment]]:
    """(live segments, oldest first; stale ones) of a category folder."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    found = [Segment(folder / name, int(m[1]), int(m[2]))
             for name in names if (m := SEGMENT_NAME.fullmatch(name))]  # fmt: skip
    live, stale = [], []
    for seg in found:
        inside = any(o is not seg and o.lo <= seg.lo and seg.hi <= o.hi for o in found)
        (stale if inside else live).append(seg)
    return sorted(live, key=lambda seg: seg.lo), stale


def next_segment_number(folder: Path) -> int:
    """One past the highest commit number of a folder's segments, stale ones included."""
    live, stale = segments(folder)
    return max((seg.hi for seg in live + stale), default=0) + 1


def merge_tail(sizes: list[int]) -> int:
    """How many of a folder's newest segments to merge into one, given every live segment's
    size in bytes (oldest first; a file's size stands for its rows: features are most of it);
    0 for none.

    Class c holds the sizes below CLASS_BYTES * MERGE_FANOUT ** (c + 1). When the newest
    segments of a class and below hold MERGE_FANOUT of that class and together reach the next
    class, they are merged (the result may complete the next class in turn: the merges of one
    call are done as one). A sealed segment (SEALED_BYTES or more) ends the tail. Every merge
    so moves its rows up a class: a row is rewritten at most once per class below the sealed
    size (three), however large its category grows, and a write of the category files costs
    the same at any database size (merging everything newer than the last segment more than
    twice their size, the rule this replaces, rewrote a row once per tripling)."""
    tail = [(size, 1) for size in sizes]  # (bytes, segments merged into it)
    for size_class in range(_size_class(SEALED_BYTES) + 1):
        n = same = 0
        for size, _ in reversed(tail):
            if size >= SEALED_BYTES or _size_class(size) > size_class:
                break
            n, same = n + 1, same + (_size_class(size) == size_class)
        merged = tail[len(tail) - n :]
        total = sum(size for size, _ in merged)
        if same >= MERGE_FANOUT and _size_class(total) > size_class:
            tail[len(tail) - n :] = [(total, sum(k for _, k in merged))]
    return tail[-1][1] if tail and tail[-1][1] > 1 else 0


def _size_class(size: int) -> int:
    size_class, bound = 0, CLASS_BYTES * MERGE_FANOUT
    while size >= bound:
        size_class, bound = size_class + 1, bound * MERGE_FANOUT
    return size_class


def read_segment(path: Path, dim: int) -> CategoryRows:
    """All rows of one segment, committed or not; validated. Raises FileNotFoundError,
    DatabaseError."""
    a = load_npz(path, COLUMNS)
    ids, files, probs, features = (a[c] for c in COLUMNS)
    n = len(ids) if ids.ndim == 1 else -1
    if not (
        ids.dtype == np.int64 and n >= 0 and files.shape == (n,) and files.dtype.kind == "U"
        and probs.shape == (n,) and probs.dtype == np.float32
        and features.shape == (n, dim) and features.dtype == FEATURE_DTYPE
    ):  # fmt: skip
        raise damaged(path, f"its arrays are not {n} rows of ids, files, probs and "
                            f"features ({dim} float16 each)")  # fmt: skip
    return CategoryRows(ids, files, probs, features)


def read_folder(folder: Path, dim: int) -> CategoryRows:
    """All rows of a category's live segments, committed or not, oldest first. Raises
    FileNotFoundError when it has none, DatabaseError when one is damaged.

    A writer may merge or drop a segment between listing the folder and reading it (readers
    take no lock): the folder is then listed again."""
    for _ in range(READ_ATTEMPTS):
        live, _ = segments(folder)
        if not live:
            raise FileNotFoundError(folder / "features.*.npz")
        try:
            return CategoryRows.concatenate([read_segment(s.path, dim) for s in live], dim)
        except FileNotFoundError:
            continue
    raise DatabaseError(f"{folder} changed under every one of {READ_ATTEMPTS} reads; try again")


def merging_writer(sources: list[Path], dim: int, committed: npt.NDArray[np.int64]) -> Writing:
    """Writes one segment with the committed rows of the segments `sources`, in order. The
    features, the bulk of each file, are streamed through in blocks, so memory does not grow
    with the category."""

    def write(f: io.BufferedWriter) -> None:
        with contextlib.ExitStack() as stack:
            olds, keeps, small = [], [], {c: [] for c in COLUMNS[:-1]}
            for path in sources:
                try:
                    raw = stack.enter_context(open(open_regular(path), "rb"))
                    old = stack.enter_context(zipfile.ZipFile(raw))
                    columns = {c: _read_member(old, c) for c in small}
                except DAMAGE as exc:
                    raise damaged(path, exc) from exc
                keep = np.isin(columns["ids"], committed)
                for c, parts in small.items():
                    parts.append(columns[c][keep])
                olds.append(old)
                keeps.append(keep)
            new = stack.enter_context(
                zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, compresslevel=1)
            )
            for c, parts in small.items():
                with new.open(f"{c}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.concatenate(parts), allow_pickle=False)
            shape = (sum(int(keep.sum()) for keep in keeps), dim)
            header = {"descr": FEATURE_DTYPE.str, "fortran_order": False, "shape": shape}
            with new.open("features.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for path, old, keep in zip(sources, olds, keeps, strict=True):
                    try:
                        _copy_features(old, path, dim, keep, member)
                    except DAMAGE as exc:
                        raise damaged(path, exc) from exc

    return write


def _read_member(npz: zipfile.ZipFile, name: str) -> np.ndarray:
    with npz.open(f"{name}.npy") as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _copy_features(
    old: zipfile.ZipFile, path: Path, dim: int, keep: npt.NDArray[np.bool_], out: IO[bytes]
) -> None:
    """Streams the rows of `old`'s features that `keep` selects into `out`, in blocks."""
    with old.open("features.npy") as source:
        version = np.lib.format.read_magic(source)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)  # fmt: skip
        shape, fortran, dtype = read_header(source)
        if fortran or dtype != FEATURE_DTYPE or shape != (len(keep), dim):
            raise damaged(path, f"features of shape {shape} ({dtype}), expected "
                                f"({len(keep)}, {dim}) float16")  # fmt: skip
        width = dim * FEATURE_DTYPE.itemsize
        for start in range(0, len(keep), FEATURE_BLOCK_ROWS):
            n = min(FEATURE_BLOCK_ROWS, len(keep) - start)
            block = np.frombuffer(source.read(n * width), FEATURE_DTYPE)
            if block.size != n * dim:
                raise EOFError("features end early")
            out.write(block.reshape(n, dim)[keep[start : start + n]].tobytes())
