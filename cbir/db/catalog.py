"""The catalog, catalog.sqlite: every committed image, its categories, its row of the search
matrix, and every source path. The commit point of every write.

In SQLite (Python's standard library) a commit writes only what it changes, atomically, and
callers ask for what they need by key, so neither a writer's memory nor a commit's cost grows
with the database. Source paths live here and nowhere else: results read them from here.
Errors are raised as DatabaseError naming the file and the fix; every value read back is
checked before it is used as a file name or category (the file is untrusted).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cbir import categories
from cbir.centring import sums_by_category
from cbir.db.files import damaged
from cbir.errors import DatabaseError

CATALOG_NAME = "catalog.sqlite"
SCHEMA_VERSION = 5  # 5: feature_sums; 4: keyed by matrix row; 3: images.classes
TOP_CLASSES = 32  # class probabilities kept per image: `cbir find` ranks with all 1000's
# mean AP on evaldata at 32, and loses 0.05 at 4 (bench/bench_find.py)
_SCHEMA = """
CREATE TABLE images (         -- keyed by matrix row, which only grows: a commit appends to
    row INTEGER PRIMARY KEY,    -- the table instead of dirtying a page per image (at 1M images
                                -- 45 instead of 67 ms per 1024; README.md)
    id INTEGER NOT NULL UNIQUE, -- first 8 bytes of the SHA-256, signed (cbir.hashing)
    sha256 TEXT NOT NULL,       -- hex digest of the file
    stored_name TEXT NOT NULL,  -- name of its copies in its category folders
    wnids TEXT NOT NULL,        -- its categories, most probable first, space-separated
    probs BLOB NOT NULL,        -- their probabilities, little-endian float32
    list INTEGER,               -- its inverted list (cbir.db.ivf), NULL before one is trained,
                                -- -1 while it is among the new rows
    classes BLOB NOT NULL       -- its TOP_CLASSES most probable classes: uint16 output indices,
                                -- then float16 probabilities, little-endian (cbir find);
                                -- empty for a catalog rebuilt from category files
);
CREATE INDEX images_by_list ON images (list);  -- holds the row (the rowid)
CREATE TABLE placements (       -- image_id (matrix row `row`) is stored in category wnid: a
    wnid TEXT NOT NULL,          -- query reads a category's rows without a join, and a commit
    row INTEGER NOT NULL,        -- appends at the end of each category's range (at 1M images
    image_id INTEGER NOT NULL,   -- 70 instead of 150 ms per 1024 images; README.md)
    PRIMARY KEY (wnid, row)
) WITHOUT ROWID;
CREATE TABLE category_sizes (   -- rows of placements per wnid, kept by each commit
    wnid TEXT PRIMARY KEY, n INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE feature_sums (     -- sum of the stored (float16) features of the images in
    wnid TEXT PRIMARY KEY,       -- category wnid ('': of every image), float64 little-endian,
    sum BLOB NOT NULL            -- kept by each commit: the centre and category centroids of a
) WITHOUT ROWID;                 -- query (cbir.centring). float16 values add up exactly in
                                 -- float64, so adding and removing keep it equal to a sum made
                                 -- afresh, in any order
CREATE TABLE paths (            -- source files; path is os.fsencode(str path)
    path BLOB PRIMARY KEY, image_id INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX paths_by_image ON paths (image_id);
CREATE TABLE query_head (       -- the head `cbir train` learned (cbir.centring): one row or
    id INTEGER PRIMARY KEY CHECK (id = 1),  -- none; catalogs made before it have no table
    matrix BLOB NOT NULL,        -- (d, d) float32 little-endian, row-major
    provenance TEXT NOT NULL     -- JSON object: what it was trained on, how, when, its loss
);
CREATE TABLE meta (             -- matrix_generation: the matrix file in use (it is named
    key TEXT PRIMARY KEY,       -- after it); matrix_rows: how many of its rows are committed;
    value INTEGER NOT NULL      -- ivf_generation: the IVF file in use (0: none); ivf_trained:
                                -- images the database held when it was trained;
                                -- recorded_rows: images of rows below it are in their
                                -- category files (those above are written in batches);
                                -- sums_version: bumped whenever feature_sums changes;
                                -- head_version: whenever query_head does
) WITHOUT ROWID;
"""
# Reads the stored features of matrix rows: rows (r,) int64 -> (r, d) float32 (float16 values)
FeatureReader = Callable[[npt.NDArray[np.int64]], npt.NDArray[np.float32]]
MAX_HEAD_VALUE = 1e3  # largest entry of a stored query head that is believed
_IN_CHUNK = 500  # values per "IN (...)" query, below SQLite's limit on parameters
_STORED_NAME = re.compile(r"[^/\x00]{1,255}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ImageRecord:
    """One committed image."""

    image_id: int
    sha256: str
    stored_name: str  # a plain file name (checked): its copies' name in its category folders
    wnids: tuple[str, ...]  # known ImageNet wnids (checked), most probable first
    probs: tuple[float, ...]  # their probabilities
    row: int  # its row of the search matrix
    ivf_list: int | None = None  # its inverted list, -1 while new (written, not read back)
    top_classes: bytes = b""  # encode_classes(...) (written by the writer, not read back)


@dataclass(frozen=True)
class PathRecord:
    image_id: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Committed:
    """What a commit changed: images added and dropped, and the dropped ones' copies by
    category (wnid -> {image id: stored name}), which the writer then takes out of the
    category folders."""

    added: int
    dropped: int
    dropped_copies: dict[str, dict[int, str]]

    @property
    def dropped_from(self) -> set[str]:
        return set(self.dropped_copies)


class Catalog:
    """One connection to catalog.sqlite. Safe to share between threads: calls take turns."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._conn = connection
        self._lock = threading.RLock()
        self._snapshots = 0  # depth of snapshot() blocks open on this connection

    @classmethod
    def open(cls, path: Path, writable: bool = True) -> Catalog:
        """An existing catalog. Opened read-write where the file allows it, so that a reader
        can roll back what a killed writer left half done (SQLite's hot journal); read-only
        media are opened immutable."""
        if os.path.islink(path) or (os.path.lexists(path) and not path.is_file()):
            raise damaged(path, "not a regular file")
        if not path.exists():
            raise DatabaseError(f"{path} is missing; run 'cbir check --repair'")
        mode = "rw" if writable and os.access(path, os.W_OK) else "ro"
        uri = f"file:{_quoted(path)}?mode={mode}"
        if mode == "ro" and not os.access(path.parent, os.W_OK):
            uri += "&immutable=1"  # nobody can be writing it: no journal to look for
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
        except sqlite3.Error as exc:
            raise damaged(path, exc) from exc
        catalog = cls(path, conn)
        version = catalog._one("PRAGMA user_version")
        if version != SCHEMA_VERSION:
            catalog.close()
            raise damaged(path, f"catalog schema version {version}, expected {SCHEMA_VERSION}")
        return catalog

    @classmethod
    def create(cls, path: Path) -> Catalog:
        """A new, empty catalog file at `path` (the writer renames it into place)."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
        conn.execute("INSERT INTO meta VALUES ('matrix_rows', 0), ('matrix_generation', 1), "
                     "('ivf_generation', 0), ('ivf_trained', 0), ('recorded_rows', 0)")
        return cls(path, conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def keep_pages(self, mib: int) -> None:
        """Let this connection cache up to `mib` MiB of pages (SQLite's default: 2). A
        commit of 1024 images into a large catalog dirties a page of each random-keyed index
        per image (the image id, the paths by image); with the default cache, pages spill and
        are read again at every commit."""
        with self._lock:
            self._conn.execute(f"PRAGMA cache_size = {-1024 * int(mib)}")

    # -- reading ----------------------------------------------------------------------------

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise damaged(self.path, exc) from exc

    def _one(self, sql: str, params: Sequence[object] = ()) -> object:
        rows = self._rows(sql, params)
        return rows[0][0] if rows else None

    def _iterate(self, sql: str, batch: int = 4096) -> Iterator[tuple]:
        """Rows of a query, fetched in batches on a cursor of their own (not all in memory)."""
        with self._lock:
            cursor = self._conn.cursor()
        try:
            cursor.execute(sql)
            while rows := cursor.fetchmany(batch):
                yield from rows
        except sqlite3.DatabaseError as exc:
            raise damaged(self.path, exc) from exc
        finally:
            cursor.close()

    def matrix_state(self) -> tuple[int, int]:
        """(generation of the matrix file in use, how many of its rows are committed); rows
        past those are a writer's uncommitted ones."""
        meta = dict(self._rows("SELECT key, value FROM meta"))
        gen, n = meta.get("matrix_generation"), meta.get("matrix_rows")
        if not isinstance(gen, int) or not isinstance(n, int) or gen < 1 or n < 0:
            raise damaged(self.path, "no valid matrix state")
        return gen, n

    def ivf_state(self) -> tuple[int, int]:
        """(generation of the IVF file in use, 0 when there is none; images when trained)."""
        meta = dict(self._rows("SELECT key, value FROM meta"))
        gen, trained = meta.get("ivf_generation", 0), meta.get("ivf_trained", 0)
        if not isinstance(gen, int) or not isinstance(trained, int) or gen < 0:
            raise damaged(self.path, "no valid IVF state")
        return gen, trained

    def rows_of_lists(self, lists: Sequence[int]) -> npt.NDArray[np.int64]:
        """(r,) int64 sorted matrix rows of the images in inverted lists `lists`."""
        return self._sorted_rows("SELECT row FROM images WHERE list IN ({})",
                                 [int(x) for x in lists])  # fmt: skip

    def rows_by_list(self, lists: Sequence[int]) -> dict[int, npt.NDArray[np.int64]]:
        """list -> (m,) sorted matrix rows of its images, for a few lists in one read."""
        found: dict[int, list[int]] = {int(x): [] for x in lists}
        marks = ",".join("?" * len(found))
        for lst, row in self._rows(f"SELECT list, row FROM images WHERE list IN ({marks}) "
                                   "ORDER BY list, row", list(found)):  # fmt: skip
            found[lst].append(row)
        return {x: np.array(rows, np.int64) for x, rows in found.items()}

    def lists_in_row_order(self) -> npt.NDArray[np.int64]:
        """(n,) every image's inverted list (-1: none), in matrix row order (as all_rows)."""
        return np.array([-1 if x is None else x for (x,) in
                         self._rows("SELECT list FROM images ORDER BY row")], np.int64)  # fmt: skip

    def unlisted(self, n_lists: int) -> int:
        """Images without a valid inverted list, the new rows' (-1) aside (there should be
        none while one is in use)."""
        return int(self._one("SELECT count(*) FROM images WHERE list IS NULL OR list < -1 "
                             "OR list >= ?", (n_lists,)))  # type: ignore[arg-type]  # fmt: skip

    def count_in_list(self, lst: int) -> int:
        """Images in inverted list `lst` (e.g. cbir.db.ivf.NEW_ROWS)."""
        found = self._one("SELECT count(*) FROM images WHERE list = ?", (lst,))
        return int(found)  # type: ignore[arg-type]

    def set_lists(
        self, rows: Iterable[tuple[int, int]], generation: int, trained: int,
        only_these: bool = False,
    ) -> None:
        """(row, list) of every image (or, `only_these`, of some: the others keep theirs),
        and the IVF generation they belong to, in one commit."""
        with self.transaction() as conn:
            if not only_these:
                conn.execute("UPDATE images SET list = NULL")
            conn.executemany("UPDATE images SET list = ? WHERE row = ?",
                             ((lst, row) for row, lst in rows))  # fmt: skip
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             (("ivf_generation", generation), ("ivf_trained", trained)))

    def invalid_images(self) -> list[int]:
        """Ids of the images whose fields do not pass the checks every read makes (a damaged
        or tampered catalog), found by one pass over the table."""
        bad = []
        for r in self._iterate("SELECT id, sha256, stored_name, wnids, probs, row FROM images"):
            try:
                self._record(r)
            except DatabaseError:
                bad.append(r[0])
        return bad

    def misplaced_rows(self) -> int:
        """Placements whose row is not their image's (or whose image is gone): damage."""
        return int(self._one(  # type: ignore[arg-type]
            "SELECT count(*) FROM placements p LEFT JOIN images i ON i.id = p.image_id "
            "WHERE i.row IS NULL OR i.row != p.row"))

    def mend_placements(self) -> None:
        """check --repair: placements of no image dropped, the others given their image's row
        (category sizes recounted)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM placements WHERE image_id NOT IN (SELECT id FROM images)")
            _copy_rows_to_placements(conn)
            conn.execute("DELETE FROM category_sizes")
            conn.execute("INSERT INTO category_sizes SELECT wnid, count(*) FROM placements "
                         "GROUP BY wnid")

    def unknown_categories(self) -> list[str]:
        """Category ids in placements or category_sizes that are not ImageNet classes."""
        names = {str(r[0]) for r in self._rows(
            "SELECT DISTINCT wnid FROM placements UNION SELECT wnid FROM category_sizes")}
        return sorted(n for n in names if not categories.is_wnid(n))

    def forget_categories(self, wnids: Sequence[str]) -> None:
        """Delete rows naming unknown categories (check --repair: no folder can be theirs)."""
        with self.transaction() as conn:
            for wnid in wnids:
                conn.execute("DELETE FROM placements WHERE wnid = ?", (wnid,))
                conn.execute("DELETE FROM category_sizes WHERE wnid = ?", (wnid,))
                conn.execute("DELETE FROM feature_sums WHERE wnid = ?", (wnid,))
            _bump_sums_version(conn)

    def recorded_rows(self) -> int:
        """Images whose matrix row is below this are in their category files."""
        n = dict(self._rows("SELECT key, value FROM meta")).get("recorded_rows")
        if not isinstance(n, int) or n < 0:
            raise damaged(self.path, "no valid recorded_rows")
        return n

    def set_recorded_rows(self, n: int) -> None:
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('recorded_rows', ?)", (n,))

    def count_from_row(self, start: int) -> int:
        return int(self._one("SELECT count(*) FROM images WHERE row >= ?", (start,)))  # type: ignore[arg-type]

    def images_from_row(self, start: int) -> list[ImageRecord]:
        """The images whose matrix row is `start` or later, in row order."""
        rows = self._rows("SELECT id, sha256, stored_name, wnids, probs, row FROM images "
                          "WHERE row >= ? ORDER BY row", (start,))  # fmt: skip
        return [self._record(r) for r in rows]

    def has_image(self, image_id: int) -> bool:
        return self._one("SELECT 1 FROM images WHERE id = ?", (image_id,)) is not None

    def image(self, image_id: int) -> ImageRecord | None:
        rows = self._rows("SELECT id, sha256, stored_name, wnids, probs, row FROM images "
                          "WHERE id = ?", (image_id,))  # fmt: skip
        return self._record(rows[0]) if rows else None

    def images(self) -> Iterator[ImageRecord]:
        """Every image, by id, streamed."""
        for r in self._iterate("SELECT id, sha256, stored_name, wnids, probs, row FROM images "
                               "ORDER BY id"):  # fmt: skip
            yield self._record(r)

    def _record(self, r: tuple) -> ImageRecord:
        image_id, sha, name, wnids, probs, row = r
        wnid_list = tuple(str(wnids).split())
        if not (
            isinstance(sha, str) and _SHA256.fullmatch(sha)
            and _is_stored_name(name)
            and wnid_list and all(categories.is_wnid(w) for w in wnid_list)
            and len(set(wnid_list)) == len(wnid_list)
            and isinstance(probs, bytes) and len(probs) == 4 * len(wnid_list)
            and isinstance(row, int) and row >= 0
        ):  # fmt: skip
            raise damaged(self.path, f"image {image_id} has invalid fields")
        values = tuple(float(p) for p in np.frombuffer(probs, "<f4"))
        return ImageRecord(image_id, sha, name, wnid_list, values, row)

    def images_in(self, wnid: str, skip_invalid: bool = False) -> list[ImageRecord]:
        """The images stored in category `wnid`, by id; invalid ones raise DatabaseError, or
        are left out with `skip_invalid` (check reports them on its own)."""
        rows = self._rows("SELECT i.id, i.sha256, i.stored_name, i.wnids, i.probs, i.row "
                          "FROM placements p JOIN images i ON i.id = p.image_id "
                          "WHERE p.wnid = ? ORDER BY i.id", (wnid,))  # fmt: skip
        records = []
        for r in rows:
            try:
                records.append(self._record(r))
            except DatabaseError:
                if not skip_invalid:
                    raise
        return records

    def path_record(self, path: str) -> PathRecord | None:
        rows = self._rows(
            "SELECT image_id, size, mtime_ns FROM paths WHERE path = ?", (os.fsencode(path),)
        )
        return PathRecord(*rows[0]) if rows else None

    def paths(self) -> Iterator[tuple[str, PathRecord]]:
        """Every source path and what it points at, sorted by path bytes, streamed."""
        for key, image_id, size, mtime in self._iterate(
            "SELECT path, image_id, size, mtime_ns FROM paths ORDER BY path"
        ):
            yield os.fsdecode(key), PathRecord(image_id, size, mtime)

    def paths_of(self, image_id: int) -> list[str]:
        """The source paths of one image, sorted."""
        rows = self._rows("SELECT path FROM paths WHERE image_id = ? ORDER BY path", (image_id,))
        return [os.fsdecode(r[0]) for r in rows]

    def class_probabilities(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids (n,), classes (n, TOP_CLASSES) int64 output indices, -1 past an image's
        own, their probabilities (n, TOP_CLASSES) float32) of every image, streamed from
        the catalog. An image with no valid stored classes (a catalog rebuilt from category
        files) gives its categories' probabilities instead."""
        position = {w: i for i, w in enumerate(categories.wnids())}
        ids: list[int] = []
        classes = np.full((0, TOP_CLASSES), -1, np.int64)
        probs = np.zeros((0, TOP_CLASSES), np.float32)
        batch_classes, batch_probs = [], []
        for image_id, wnids, stored_probs, blob in self._iterate(
            "SELECT id, wnids, probs, classes FROM images ORDER BY id"
        ):
            row_classes = np.full(TOP_CLASSES, -1, np.int64)
            row_probs = np.zeros(TOP_CLASSES, np.float32)
            k = len(blob) // 4 if isinstance(blob, bytes) and len(blob) % 4 == 0 else 0
            found = np.frombuffer(blob, "<u2", k).astype(np.int64) if k else np.zeros(0, int)
            values = np.frombuffer(blob, "<f2", k, 2 * k).astype(np.float32) if k else found
            if k and k <= TOP_CLASSES and (found < len(position)).all() and (
                np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
            ):  # fmt: skip
                row_classes[:k], row_probs[:k] = found, values
            else:
                wnid_list = str(wnids).split()
                if isinstance(stored_probs, bytes) and len(stored_probs) == 4 * len(wnid_list) \
                        and all(w in position for w in wnid_list):
                    kept = wnid_list[:TOP_CLASSES]
                    row_classes[: len(kept)] = [position[w] for w in kept]
                    row_probs[: len(kept)] = np.frombuffer(stored_probs, "<f4")[: len(kept)]
            ids.append(int(image_id))
            batch_classes.append(row_classes)
            batch_probs.append(row_probs)
        if batch_classes:
            classes, probs = np.stack(batch_classes), np.stack(batch_probs)
        return np.array(ids, np.int64), classes, probs

    def images_with_several_paths(self) -> set[int]:
        """Ids of the images more than one source path points at (identical content)."""
        rows = self._rows("SELECT image_id FROM paths GROUP BY image_id HAVING count(*) > 1")
        return {int(r[0]) for r in rows}

    def n_images(self) -> int:
        return int(self._one("SELECT count(*) FROM images"))  # type: ignore[arg-type]

    def n_paths(self) -> int:
        return int(self._one("SELECT count(*) FROM paths"))  # type: ignore[arg-type]

    def category_sizes(self, known_only: bool = False) -> dict[str, int]:
        """wnid -> number of images stored in that category. An unknown wnid is damage: it
        raises DatabaseError, or is left out with `known_only` (check reports it)."""
        sizes = dict(self._rows("SELECT wnid, n FROM category_sizes ORDER BY wnid"))
        for wnid, n in list(sizes.items()):
            if not categories.is_wnid(wnid) or not isinstance(n, int):
                if not known_only:
                    raise damaged(self.path, f"unknown category {str(wnid)[:40]!r}")
                del sizes[wnid]
        return sizes

    def members(self, wnid: str) -> npt.NDArray[np.int64]:
        """(m,) sorted ids of the images stored in category `wnid`."""
        rows = self._rows("SELECT image_id FROM placements WHERE wnid = ? ORDER BY image_id",
                          (wnid,))  # fmt: skip
        return np.array([r[0] for r in rows], np.int64)

    def rows_of_categories(self, wnids: Sequence[str]) -> npt.NDArray[np.int64]:
        """(r,) int64 sorted matrix rows of the images in any of `wnids`, each image once
        (the order a scan of the matrix meets them). Rows only: reading the ids as well took
        twice as long at 1M images; a query looks up the ids of its hits alone."""
        return self._sorted_rows("SELECT row FROM placements WHERE wnid IN ({})", list(wnids))

    def rows_by_category(self, wnids: Sequence[str]) -> dict[str, npt.NDArray[np.int64]]:
        """wnid -> (m,) sorted matrix rows of its images, for many categories in one read (a
        query's gate walks through hundreds of small ones)."""
        found: dict[str, list[int]] = {w: [] for w in wnids}
        keys = list(wnids)
        for start in range(0, len(keys), _IN_CHUNK):
            chunk = keys[start : start + _IN_CHUNK]
            for wnid, row in self._rows("SELECT wnid, row FROM placements WHERE wnid IN "
                                        f"({','.join('?' * len(chunk))}) ORDER BY wnid, row",
                                        chunk):  # fmt: skip
                found[wnid].append(row)
        return {w: np.array(rows, np.int64) for w, rows in found.items()}

    def _sorted_rows(self, sql: str, keys: list) -> npt.NDArray[np.int64]:
        parts = [np.zeros(0, np.int64)]
        for start in range(0, len(keys), _IN_CHUNK):
            chunk = keys[start : start + _IN_CHUNK]
            with self._lock:
                try:
                    cursor = self._conn.execute(sql.format(",".join("?" * len(chunk))), chunk)
                    parts.append(np.fromiter((r for (r,) in cursor), np.int64))
                except sqlite3.DatabaseError as exc:
                    raise damaged(self.path, exc) from exc
        return np.unique(np.concatenate(parts))

    def ids_of_rows(self, rows: Iterable[int]) -> dict[int, int]:
        """matrix row -> image id, for the rows that a committed image owns."""
        wanted = [int(r) for r in rows]
        found: dict[int, int] = {}
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(self._rows(f"SELECT row, id FROM images WHERE row IN ({marks})", chunk))
        return found

    def images_at_rows(self, rows: Sequence[int]) -> dict[int, ImageRecord]:
        """matrix row -> its image, for the rows that a committed image owns."""
        found: dict[int, ImageRecord] = {}
        for start in range(0, len(rows), _IN_CHUNK):
            chunk = [int(r) for r in rows[start : start + _IN_CHUNK]]
            marks = ",".join("?" * len(chunk))
            for r in self._rows("SELECT id, sha256, stored_name, wnids, probs, row FROM images "
                                f"WHERE row IN ({marks})", chunk):  # fmt: skip
                record = self._record(r)
                found[record.row] = record
        return found

    def all_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of every image, in matrix order: for small databases and tools."""
        pairs = self._rows("SELECT id, row FROM images ORDER BY row")
        array = np.array(pairs, np.int64).reshape(len(pairs), 2)
        return array[:, 0].copy(), array[:, 1].copy()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one committed state: a commit or compaction by a writer beside
        this reader (a server while `cbir add` runs) waits until the block ends. Meant for
        one query (milliseconds): other threads using this catalog wait too."""
        with self._lock:
            if self._snapshots:  # nested: the outer snapshot holds
                self._snapshots += 1
                try:
                    yield
                finally:
                    self._snapshots -= 1
                return
            try:
                self._conn.execute("BEGIN")
                self._conn.execute("SELECT count(*) FROM meta").fetchall()  # take the lock now
            except sqlite3.DatabaseError as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                    raise DatabaseError(f"{self.path} stayed locked by a writer; try again") \
                        from exc
                raise damaged(self.path, exc) from exc
            self._snapshots = 1
            try:
                yield
            finally:
                self._snapshots = 0
                self._conn.execute("COMMIT")

    # -- writing (the writer only) ----------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One commit: all of it is on disk afterwards, or none of it."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                raise _write_error(self.path, exc) from exc
            except sqlite3.DatabaseError as exc:
                raise damaged(self.path, exc) from exc

    def commit(
        self,
        images: Iterable[ImageRecord] = (),
        paths: Iterable[tuple[str, PathRecord]] = (),
        forget: Iterable[str] = (),
        matrix_rows: int | None = None,
        features_of: FeatureReader | None = None,
    ) -> Committed:
        """In one transaction: insert the `images` not held yet, point `paths` at theirs,
        forget the paths in `forget` and record the matrix's committed rows; images no path
        points at any more are dropped. `features_of` reads the stored features of matrix
        rows (committed or just appended): the feature sums follow what was added and
        dropped (required whenever images are)."""
        with self.transaction() as conn:
            added, displaced = insert(conn, images, paths)
            for path in forget:
                key = os.fsencode(path)
                displaced.update(_image_of(conn, key))
                conn.execute("DELETE FROM paths WHERE path = ?", (key,))
            dropped, copies = _drop_unreferenced(conn, sorted(displaced))
            if added or dropped:
                if features_of is None:
                    raise ValueError("a commit that adds or drops images needs features_of")
                _add_to_sums(conn, [(r.row, r.wnids) for r in added], features_of, +1)
                _add_to_sums(conn, dropped, features_of, -1)
            if matrix_rows is not None:
                set_matrix_rows(conn, matrix_rows)
            return Committed(len(added), len(dropped), copies)

    def move_rows(self, new_rows: dict[int, int], generation: int, matrix_rows: int) -> None:
        """Point every image at its row of a rewritten matrix (image id -> row), and record
        the matrix's generation, in one commit: the new matrix file is used from then on."""
        with self.transaction() as conn:
            conn.execute("UPDATE images SET row = -1 - row")  # free every row number first
            conn.executemany("UPDATE images SET row = ? WHERE id = ?",
                             ((row, image_id) for image_id, row in new_rows.items()))  # fmt: skip
            left = conn.execute("SELECT count(*) FROM images WHERE row < 0").fetchone()[0]
            if left:
                raise DatabaseError(f"{left} images were given no row of the new matrix")
            _copy_rows_to_placements(conn)
            set_matrix_rows(conn, matrix_rows)
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             (("matrix_generation", generation), ("recorded_rows", matrix_rows)))

    def drop_images(self, ids: Iterable[int], features_of: FeatureReader | None) -> Committed:
        """Forget images and their paths (check --repair: nothing is left to rebuild them).
        Without `features_of` (the matrix is not to be trusted) the feature sums are deleted
        in the same commit: until they are summed afresh, queries are not centred (rather
        than centred on a wrong mean), and the next writer or check sums them again."""
        with self.transaction() as conn:
            ids = list(ids)
            conn.executemany("DELETE FROM paths WHERE image_id = ?", ((i,) for i in ids))
            dropped, copies = _drop_unreferenced(conn, ids)
            if features_of is not None:
                _add_to_sums(conn, dropped, features_of, -1)
            elif dropped:
                conn.execute("DELETE FROM feature_sums")
                _bump_sums_version(conn)
            return Committed(0, len(dropped), copies)

    def sums_version(self) -> int:
        """Changes whenever the feature sums do (every commit that adds or drops images, a
        repair): what a reader's cache of the centre is keyed by."""
        value = self._one("SELECT value FROM meta WHERE key = 'sums_version'")
        return value if isinstance(value, int) else 0

    def has_feature_sums(self) -> bool:
        """Whether the sum of every image is there (a catalog rebuilt by check, or a repair
        that dropped images, has none until they are summed afresh)."""
        return self._one("SELECT 1 FROM feature_sums WHERE wnid = ''") is not None

    def feature_sums(self, dim: int) -> dict[str, npt.NDArray[np.float64]]:
        """wnid -> (d,) float64 sum of the stored features of its images; '' -> of every
        image (absent while the database is empty). A value that is not d finite numbers is
        damage (check --repair sums them afresh)."""
        sums = {}
        for wnid, blob in self._rows("SELECT wnid, sum FROM feature_sums"):
            if not isinstance(blob, bytes) or len(blob) != 8 * dim or not (
                wnid == "" or categories.is_wnid(wnid)
            ):
                raise damaged(self.path, "invalid feature sums; run 'cbir check --repair'")
            value = np.frombuffer(blob, "<f8").astype(np.float64)
            if not np.isfinite(value).all():
                raise damaged(self.path, "invalid feature sums; run 'cbir check --repair'")
            sums[str(wnid)] = value
        return sums

    def set_feature_sums(self, sums: dict[str, npt.NDArray[np.float64]]) -> None:
        """Replace every feature sum (check --repair, from a pass over the matrix)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM feature_sums")
            conn.executemany("INSERT INTO feature_sums VALUES (?, ?)",
                             ((w, np.asarray(v, "<f8").tobytes()) for w, v in sums.items()))
            _bump_sums_version(conn)

    # -- the query head (cbir train) -----------------------------------------------------------

    def head_version(self) -> int:
        """Changes whenever the query head is set or removed: a reader's cache key."""
        value = self._one("SELECT value FROM meta WHERE key = 'head_version'")
        return value if isinstance(value, int) else 0

    def query_head(self, dim: int) -> tuple[npt.NDArray[np.float32], dict] | None:
        """(matrix (d, d) float32, provenance) of the trained query head, or None. Anything
        but d * d finite numbers and a JSON object is damage (check --repair removes it)."""
        if self._one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'query_head'") \
                is None:  # fmt: skip
            return None  # a catalog from before cbir train
        found = self._rows("SELECT matrix, provenance FROM query_head WHERE id = 1")
        if not found:
            return None
        blob, text = found[0]
        problem = "invalid query head; run 'cbir check --repair', then 'cbir train' again"
        if not isinstance(blob, bytes) or len(blob) != 4 * dim * dim or not isinstance(text, str):
            raise damaged(self.path, problem)
        matrix = np.frombuffer(blob, "<f4").astype(np.float32).reshape(dim, dim)
        try:
            provenance = json.loads(text)
        except (ValueError, RecursionError):
            provenance = None
        # A trained head stays near the identity: zeros or huge values would rank garbage
        size = float(np.abs(matrix).max()) if np.isfinite(matrix).all() else np.inf
        if not isinstance(provenance, dict) or not 0 < size <= MAX_HEAD_VALUE:
            raise damaged(self.path, problem)
        return matrix, provenance

    def has_query_head(self) -> bool:
        """Whether a query head is stored, valid or not (what --reset removes)."""
        if self._one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'query_head'") \
                is None:  # fmt: skip
            return False
        return self._one("SELECT count(*) FROM query_head") != 0

    def set_query_head(self, matrix: npt.NDArray[np.float32] | None, provenance: dict) -> None:
        """Store the query head (d, d) with its provenance, replacing any; None removes it."""
        with self.transaction() as conn:
            conn.execute("DROP TABLE IF EXISTS query_head")  # whatever shape it was given
            conn.execute("CREATE TABLE query_head (id INTEGER PRIMARY KEY CHECK (id = 1), "
                         "matrix BLOB NOT NULL, provenance TEXT NOT NULL)")
            if matrix is not None:
                conn.execute("INSERT INTO query_head VALUES (1, ?, ?)",
                             (np.ascontiguousarray(matrix, "<f4").tobytes(),
                              json.dumps(provenance, sort_keys=True)))  # fmt: skip
            conn.execute("INSERT INTO meta VALUES ('head_version', 1) "
                         "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")

    def rows_and_categories(self) -> Iterator[tuple[int, tuple[str, ...]]]:
        """(matrix row, categories) of every image in row order, streamed (check)."""
        for row, wnids in self._iterate("SELECT row, wnids FROM images ORDER BY row"):
            yield int(row), tuple(str(wnids).split())


def encode_classes(indices: Sequence[int], probs: Sequence[float]) -> bytes:
    """An image's most probable classes (output indices, probabilities) as stored."""
    return (np.asarray(indices, "<u2").tobytes()
            + np.asarray(probs, "<f2").tobytes())  # fmt: skip


def _copy_rows_to_placements(conn: sqlite3.Connection) -> None:
    """Give every placement its image's row (an orphan keeps a negative one: check's to drop).
    Rows are made negative first, so that no new row meets an old one of the same category;
    a damaged catalog's second placement of an image in one category is replaced."""
    conn.execute("UPDATE placements SET row = -1 - row WHERE row >= 0")
    conn.execute("UPDATE OR REPLACE placements SET row = (SELECT i.row FROM images i "
                 "WHERE i.id = image_id) WHERE image_id IN (SELECT id FROM images)")


def _bump_sums_version(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO meta VALUES ('sums_version', 1) "
                 "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")


def set_matrix_rows(conn: sqlite3.Connection, n: int) -> None:
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('matrix_rows', ?)", (n,))


def insert(
    conn: sqlite3.Connection,
    images: Iterable[ImageRecord],
    paths: Iterable[tuple[str, PathRecord]],
) -> tuple[list[ImageRecord], set[int]]:
    """Insert the images not held yet and set the paths; returns the images inserted, and
    the ids of the images that set paths pointed at before."""
    new = _not_held(conn, list(images))
    conn.executemany(
        "INSERT INTO images (id, sha256, stored_name, wnids, probs, row, list, classes) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        ((r.image_id, r.sha256, r.stored_name, " ".join(r.wnids),
          np.asarray(r.probs, "<f4").tobytes(), r.row, r.ivf_list, r.top_classes) for r in new),
    )  # fmt: skip
    placements = [(w, r.row, r.image_id) for r in new for w in r.wnids]
    conn.executemany("INSERT INTO placements VALUES (?, ?, ?)", placements)
    _count(conn, Counter(w for w, _, _ in placements), +1)
    displaced: set[int] = set()
    for path, rec in paths:
        key = os.fsencode(path)
        displaced.update(i for i in _image_of(conn, key) if i != rec.image_id)
        conn.execute("INSERT OR REPLACE INTO paths VALUES (?, ?, ?, ?)",
                     (key, rec.image_id, rec.size, rec.mtime_ns))  # fmt: skip
    return new, displaced


def _write_error(path: Path, exc: sqlite3.OperationalError) -> DatabaseError:
    text = str(exc)
    if "full" in text:
        return DatabaseError(f"no space left on the device writing {path}; free space and run "
                             "the same command again (what was committed is intact)")  # fmt: skip
    if "readonly" in text or "read-only" in text:
        if not path.exists():  # SQLite's "readonly" for a file deleted or moved under it
            return DatabaseError(f"{path} was deleted or moved while cbir was writing to it")
        return DatabaseError(f"{path} is read-only: cannot write to this database")
    return DatabaseError(f"cannot write {path} ({text})")


def _quoted(path: Path) -> str:
    return str(path.absolute()).replace("%", "%25").replace("?", "%3f").replace("#", "%23")


def _not_held(conn: sqlite3.Connection, images: list[ImageRecord]) -> list[ImageRecord]:
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


def _drop_unreferenced(
    conn: sqlite3.Connection, ids: list[int]
) -> tuple[list[tuple[int, tuple[str, ...]]], dict[str, dict[int, str]]]:
    """Drop the images among `ids` that no path points at; returns their (row, categories),
    and their copies by category (wnid -> {image id: stored name})."""
    dropped: list[tuple[int, tuple[str, ...]]] = []
    copies: dict[str, dict[int, str]] = {}
    for image_id in ids:
        if conn.execute("SELECT 1 FROM paths WHERE image_id = ? LIMIT 1", (image_id,)).fetchone():
            continue
        found = conn.execute("SELECT wnids, row, stored_name FROM images WHERE id = ?",
                             (image_id,)).fetchone()  # fmt: skip
        if found is None:
            continue
        wnids, row = tuple(str(found[0]).split()), found[1]
        conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
        conn.executemany("DELETE FROM placements WHERE wnid = ? AND row = ? AND image_id = ?",
                         ((w, row, image_id) for w in wnids))  # fmt: skip
        dropped.append((row, wnids))
        if _is_stored_name(found[2]):  # a damaged name is left for check to report
            for wnid in filter(categories.is_wnid, wnids):
                copies.setdefault(wnid, {})[image_id] = found[2]
    _count(conn, Counter(w for _, ws in dropped for w in ws), -1)
    return dropped, copies


def _is_stored_name(name: object) -> bool:
    """A stored copy's name: one plain, visible file name (catalog values are untrusted)."""
    return (isinstance(name, str) and bool(_STORED_NAME.fullmatch(name))
            and name not in (".", "..") and not name.startswith("."))  # fmt: skip


SUM_BLOCK = 1024  # rows whose features are read at once to sum them (check: a few MB)


def sum_features(
    images: Iterable[tuple[int, tuple[str, ...]]], features_of: FeatureReader
) -> dict[str, npt.NDArray[np.float64]]:
    """wnid -> (d,) float64 sum of the stored features of images (row, categories), '' ->
    of all of them; read SUM_BLOCK rows at a time (a commit's, or a whole database's)."""
    sums: dict[str, npt.NDArray[np.float64]] = {}
    images = iter(images)
    while block := list(itertools.islice(images, SUM_BLOCK)):
        features = features_of(np.array([row for row, _ in block], np.int64))
        for wnid, part in sums_by_category(features.astype(np.float64),
                                           [ws for _, ws in block]).items():  # fmt: skip
            sums[wnid] = sums[wnid] + part if wnid in sums else part
    return sums


def _add_to_sums(
    conn: sqlite3.Connection,
    images: list[tuple[int, tuple[str, ...]]],
    features_of: FeatureReader,
    sign: int,
) -> None:
    """Add (sign +1) or subtract (-1) the stored features of images (row, categories) to
    the sums of their categories and of the whole database."""
    deltas = sum_features(images, features_of)
    if not deltas:
        return
    keys = sorted(deltas)
    old = {}
    for start in range(0, len(keys), _IN_CHUNK):
        chunk = keys[start : start + _IN_CHUNK]
        old.update(conn.execute("SELECT wnid, sum FROM feature_sums WHERE wnid IN "
                                f"({','.join('?' * len(chunk))})", chunk))  # fmt: skip
    dim = len(next(iter(deltas.values())))
    updated = []
    for wnid in keys:
        blob = old.get(wnid)
        base = np.frombuffer(blob, "<f8") if isinstance(blob, bytes) and len(blob) == 8 * dim \
            else np.zeros(dim)
        updated.append((wnid, (base + sign * deltas[wnid]).astype("<f8").tobytes()))
    conn.executemany("INSERT OR REPLACE INTO feature_sums VALUES (?, ?)", updated)
    _bump_sums_version(conn)
    if sign < 0:  # categories left empty keep no sum
        conn.execute("DELETE FROM feature_sums WHERE wnid != '' AND wnid NOT IN "
                     "(SELECT wnid FROM category_sizes)")
