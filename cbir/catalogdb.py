"""The catalog file, catalog.sqlite: every committed image, its categories and source paths.

The catalog is the commit point of every write and grows with the database. Kept as one .npz it
had to be held in memory whole (about 2 KB an image in a writer) and rewritten whole at every
commit (3 s per 1024 images added once a database holds a million). In SQLite, from Python's
standard library, a commit writes only what it changes, atomically, and callers ask for what
they need by key: neither a writer's memory nor a commit's cost grows with the database.
Only the store calls `commit`; readers open the same file and see whole commits only.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cbir.catalog import Catalog, ImageTable, PathRecord, PathTable, str_objects

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY,     -- first 8 bytes of the SHA-256, signed (cbir.hashing)
    sha256 TEXT NOT NULL,       -- hex digest of the file
    stored_name TEXT NOT NULL,  -- name of its copies in its category folders
    wnids TEXT NOT NULL,        -- its categories, most probable first, space-separated
    probs BLOB NOT NULL         -- their probabilities, little-endian float32
);
CREATE TABLE placements (       -- image_id is stored in category wnid
    wnid TEXT NOT NULL, image_id INTEGER NOT NULL, PRIMARY KEY (wnid, image_id)
) WITHOUT ROWID;
CREATE TABLE category_sizes (   -- rows of placements per wnid, kept by each commit
    wnid TEXT PRIMARY KEY, n INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE paths (            -- source files; path is os.fsencode(str path)
    path BLOB PRIMARY KEY, image_id INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX paths_by_image ON paths (image_id);
"""
_IN_CHUNK = 500  # ids per "IN (...)" query, below SQLite's limit on parameters


@dataclass(frozen=True)
class NewRecord:
    """An image to insert: its id, hex SHA-256, stored name, categories and probabilities."""

    image_id: int
    sha256: str
    stored_name: str
    wnids: tuple[str, ...]
    probs: tuple[float, ...]


@dataclass(frozen=True)
class Committed:
    """What a commit changed: images added and dropped, and the categories of the dropped
    ones (whose rows must go too)."""

    added: int
    dropped: int
    dropped_from: set[str]


class CatalogError(Exception):
    """The file is not a readable catalog (the store names the file and the fix)."""


class CatalogDB:
    """One connection to a catalog. Safe to share between threads: calls take turns."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn = connection
        self._lock = threading.RLock()

    @classmethod
    def open(cls, path: Path) -> CatalogDB:
        """An existing catalog file. Opened read-write where the file allows it, so that a
        reader can roll back what a killed writer left half done (SQLite's hot journal)."""
        uri = f"file:{_quoted(path)}?mode=rw"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
        except sqlite3.Error as exc:
            raise CatalogError(str(exc)) from exc
        catalog = cls(conn)
        catalog._check_schema()
        return catalog

    @classmethod
    def write_new(cls, path: Path, snapshot: Catalog) -> None:
        """Write a new catalog file holding `snapshot` (the store renames it into place)."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            _fill(conn, snapshot)
        finally:
            conn.close()

    @classmethod
    def in_memory(cls, snapshot: Catalog) -> CatalogDB:
        """A catalog held in memory only: how a database of an older format is read."""
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        _fill(conn, snapshot)
        return cls(conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _check_schema(self) -> None:
        version = self._one("PRAGMA user_version")
        if version != SCHEMA_VERSION:
            raise CatalogError(f"catalog schema version {version}, expected {SCHEMA_VERSION}")

    # -- reading ----------------------------------------------------------------------------

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise CatalogError(str(exc)) from exc

    def _one(self, sql: str, params: Sequence[object] = ()) -> object:
        rows = self._rows(sql, params)
        return rows[0][0] if rows else None

    def has_image(self, image_id: int) -> bool:
        return self._one("SELECT 1 FROM images WHERE id = ?", (image_id,)) is not None

    def path_record(self, path: str) -> PathRecord | None:
        rows = self._rows(
            "SELECT image_id, size, mtime_ns FROM paths WHERE path = ?", (os.fsencode(path),)
        )
        return PathRecord(*rows[0]) if rows else None

    def n_images(self) -> int:
        return int(self._one("SELECT count(*) FROM images"))  # type: ignore[arg-type]

    def n_paths(self) -> int:
        return int(self._one("SELECT count(*) FROM paths"))  # type: ignore[arg-type]

    def category_sizes(self) -> dict[str, int]:
        """wnid -> number of images stored in that category."""
        return dict(self._rows("SELECT wnid, n FROM category_sizes ORDER BY wnid"))

    def members(self, wnid: str) -> npt.NDArray[np.int64]:
        """(m,) sorted ids of the images stored in category `wnid`."""
        rows = self._rows("SELECT image_id FROM placements WHERE wnid = ? ORDER BY image_id",
                          (wnid,))  # fmt: skip
        return np.array([r[0] for r in rows], np.int64)

    def wnids_of(self, image_id: int) -> tuple[str, ...]:
        wnids = self._one("SELECT wnids FROM images WHERE id = ?", (image_id,))
        return tuple(str(wnids).split()) if wnids is not None else ()

    def snapshot(self, k: int) -> Catalog:
        """The whole catalog in memory, as columns (for check, evaluate, remove and sync)."""
        with self._lock:
            images = self._rows("SELECT id, sha256, stored_name, wnids, probs FROM images "
                                "ORDER BY id")  # fmt: skip
            paths = self._rows("SELECT path, image_id, size, mtime_ns FROM paths")
        wnids = np.full((len(images), k), "", "U9")
        probs = np.zeros((len(images), k), np.float32)
        for i, (_, _, _, w, p) in enumerate(images):
            row_wnids, row_probs = w.split()[:k], np.frombuffer(p, "<f4")[:k]
            wnids[i, : len(row_wnids)] = row_wnids
            probs[i, : len(row_probs)] = row_probs
        table = ImageTable(
            np.array([r[0] for r in images], np.int64),
            np.array([r[1] for r in images], "S64"),
            str_objects(r[2] for r in images),
            wnids,
            probs,
        )
        return Catalog(table, PathTable(
            str_objects(os.fsdecode(r[0]) for r in paths),
            np.array([r[1] for r in paths], np.int64),
            np.array([r[2] for r in paths], np.int64),
            np.array([r[3] for r in paths], np.int64),
        ))  # fmt: skip

    # -- writing (the store only) -----------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One commit: all of it is on disk afterwards, or none of it."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def commit(
        self,
        images: Iterable[NewRecord] = (),
        paths: Iterable[tuple[str, PathRecord]] = (),
        forget: Iterable[str] = (),
    ) -> Committed:
        """In one transaction: insert the `images` not held yet, point `paths` at theirs and
        forget the paths in `forget`; images no path points at any more are dropped."""
        with self._transaction() as conn:
            added, displaced = _insert(conn, images, paths)
            for path in forget:
                key = os.fsencode(path)
                displaced.update(_image_of(conn, key))
                conn.execute("DELETE FROM paths WHERE path = ?", (key,))
            dropped, dropped_from = _drop_unreferenced(conn, sorted(displaced))
            return Committed(added, dropped, dropped_from)


def _insert(
    conn: sqlite3.Connection,
    images: Iterable[NewRecord],
    paths: Iterable[tuple[str, PathRecord]],
) -> tuple[int, set[int]]:
    """Insert the images not held yet and set the paths; returns how many images were
    inserted, and the ids of the images that set paths pointed at before."""
    new = _not_held(conn, list(images))
    conn.executemany(
        "INSERT INTO images VALUES (?, ?, ?, ?, ?)",
        ((r.image_id, r.sha256, r.stored_name, " ".join(r.wnids),
          np.asarray(r.probs, "<f4").tobytes()) for r in new),
    )  # fmt: skip
    placements = [(w, r.image_id) for r in new for w in r.wnids]
    conn.executemany("INSERT INTO placements VALUES (?, ?)", placements)
    _count(conn, Counter(w for w, _ in placements), +1)
    displaced: set[int] = set()
    for path, rec in paths:
        key = os.fsencode(path)
        displaced.update(i for i in _image_of(conn, key) if i != rec.image_id)
        conn.execute("INSERT OR REPLACE INTO paths VALUES (?, ?, ?, ?)",
                     (key, rec.image_id, rec.size, rec.mtime_ns))  # fmt: skip
    return len(new), displaced


def _quoted(path: Path) -> str:
    return str(path.absolute()).replace("%", "%25").replace("?", "%3f").replace("#", "%23")


def _fill(conn: sqlite3.Connection, snapshot: Catalog) -> None:
    conn.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
    images, paths = snapshot.images, snapshot.paths
    records = [
        NewRecord(image_id, str(sha.decode()), str(name), tuple(w for w in wnids if w),
                  tuple(probs[: sum(1 for w in wnids if w)]))
        for image_id, sha, name, wnids, probs in zip(
            images.ids.tolist(), images.sha256, images.stored_names, images.wnids.tolist(),
            images.probs.tolist(), strict=True,
        )
    ]  # fmt: skip
    path_records = [
        (path, PathRecord(image_id, size, mtime))
        for path, image_id, size, mtime in zip(
            paths.strings.tolist(), paths.ids.tolist(), paths.sizes.tolist(),
            paths.mtimes.tolist(), strict=True,
        )
    ]  # fmt: skip
    conn.execute("BEGIN")
    _insert(conn, records, path_records)
    conn.execute("COMMIT")


def _not_held(conn: sqlite3.Connection, images: list[NewRecord]) -> list[NewRecord]:
    held: set[int] = set()
    ids = [r.image_id for r in images]
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        held.update(r[0] for r in conn.execute(f"SELECT id FROM images WHERE id IN ({marks})",
                                               chunk))  # fmt: skip
    new, seen = [], set()
    for r in images:
        if r.image_id not in held and r.image_id not in seen:
            seen.add(r.image_id)
            new.append(r)
    return new


def _image_of(conn: sqlite3.Connection, key: bytes) -> list[int]:
    return [r[0] for r in conn.execute("SELECT image_id FROM paths WHERE path = ?", (key,))]


def _count(conn: sqlite3.Connection, counts: Counter[str], sign: int) -> None:
    conn.executemany(
        "INSERT INTO category_sizes VALUES (?, ?) "
        "ON CONFLICT (wnid) DO UPDATE SET n = n + excluded.n",
        ((w, sign * n) for w, n in counts.items()),
    )
    if sign < 0:
        conn.execute("DELETE FROM category_sizes WHERE n <= 0")


def _drop_unreferenced(conn: sqlite3.Connection, ids: list[int]) -> tuple[int, set[str]]:
    """Drop the images among `ids` that no path points at; returns how many, and their
    categories."""
    n, dropped = 0, Counter[str]()
    for image_id in ids:
        if conn.execute("SELECT 1 FROM paths WHERE image_id = ? LIMIT 1", (image_id,)).fetchone():
            continue
        row = conn.execute("SELECT wnids FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            continue
        wnids = row[0].split()
        conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
        conn.executemany("DELETE FROM placements WHERE wnid = ? AND image_id = ?",
                         ((w, image_id) for w in wnids))  # fmt: skip
        dropped.update(wnids)
        n += 1
    _count(conn, dropped, -1)
    return n, set(dropped)
