"""Writing a database: the only code that changes its files.

Order of a commit that adds images (each step durable before the next counts on it):
  copies into category folders -> matrix rows appended past the committed ones -> sync ->
  catalog transaction (the commit point: images, their rows and inverted lists, paths, the
  matrix's committed row count) -> manifest
Every `record_every` images (16 commits) and at the end of a run, the category files are
brought up to date: one new segment per category for the images committed since (their rows
read back from the matrix) -> sync -> renames -> the catalog's recorded_rows -> merges.
Removing: catalog transaction -> category segments rewritten without the dropped rows ->
stored copies deleted -> manifest; the matrix keeps dead rows until they outnumber live ones.

A crash at any point leaves a database whose catalog describes a complete state: matrix rows
past the committed count, segment rows and copies the catalog does not list are invisible to
readers, and the next writer (seeing the `.writing` marker) removes them and writes the
category files the crash left behind before going on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cbir import categories
from cbir.db import ivf
from cbir.db.catalog import (
    CATALOG_NAME,
    Catalog,
    ImageRecord,
    PathRecord,
    encode_classes,
    sum_features,
)
from cbir.db.category_files import (
    CategoryRows,
    Segment,
    merge_tail,
    merging_writer,
    segments,
)
from cbir.db.database import Database
from cbir.db.files import (
    GenerationFiles,
    fsync_dir,
    load_npz,
    tmp_name,
    write_atomic,
    write_many_atomic,
)
from cbir.db.manifest import (
    MANIFEST_NAME,
    Manifest,
    Settings,
    now_iso,
    read_manifest,
    write_manifest,
)
from cbir.db.matrix import MATRIX_FILES, MatrixAppender, SearchMatrix, write_matrix
from cbir.errors import CbirError, DatabaseError, DatabaseLocked
from cbir.hashing import image_id_of

LOCK_NAME = ".lock"
WRITING_NAME = ".writing"
RECORD_EVERY = 16384  # committed images between two writes of the category files
ADDING_CACHE_MIB = 64  # the catalog's page cache while adding: 1024 images commit in 0.41
# instead of 0.54 s at 1M images (bench/bench_db.py)
MIN_DEAD_ROWS = 4096  # the matrix is compacted once dead rows are this many and outnumber live
OWN_FILES = (LOCK_NAME, WRITING_NAME, CATALOG_NAME)  # what a run killed while creating leaves


@dataclass(frozen=True)
class NewImage:
    """One described image, ready to be stored."""

    source_path: Path
    sha256: str  # hex digest of the file's bytes
    size: int
    mtime_ns: int
    wnids: tuple[str, ...]  # top-k categories, most probable first
    probs: tuple[float, ...]  # their probabilities
    feature: npt.NDArray[np.float32]  # (d,) unit-norm
    top_classes: tuple[int, ...] = ()  # its TOP_CLASSES most probable classes (output indices)
    top_probs: tuple[float, ...] = ()  # their probabilities

    @property
    def image_id(self) -> int:
        return image_id_of(self.sha256)


def stored_name(source_path: Path, sha256: str) -> str:
    """A readable file name that never collides: two different IMG_0001.jpg get two names."""
    stem = os.fsencode(source_path.stem)[:80].decode("utf-8", "replace").lstrip(".") or "image"
    suffix = source_path.suffix.lower()
    name = f"{stem}-{sha256[:10]}{suffix}"
    return name.encode("utf-8", "replace").decode("utf-8").replace("\ufffd", "_")


class Writer:
    """Exclusive write access to a database; made by `open_writer`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.db_dir = db.db_dir
        self._appender: MatrixAppender | None = None
        self._pending_removals: set[str] = set()  # categories that may hold removed images
        self._folders: set[Path] = set()  # category folders known to exist
        # Each category folder's live segments (oldest first) with their sizes, as this writer
        # left them: listing a folder of thousands of copies at every write of the category
        # files would cost in proportion to the database. Only a writer changes segments and
        # this one holds the lock; whatever changes them otherwise forgets the folder.
        self._live: dict[Path, list[tuple[Segment, int]]] = {}
        self._n_images: int | None = None  # kept by each commit (counting costs a scan)
        self.record_every = RECORD_EVERY  # images between writes of the category files
        self._unrecorded = 0  # images committed since the category files were written
        self._adding = False  # add_images was called

    @property
    def settings(self) -> Settings:
        return self.db.settings

    @property
    def catalog(self) -> Catalog:
        return self.db.catalog

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None
        self.db.close()

    def n_images(self) -> int:
        if self._n_images is None:
            self._n_images = self.catalog.n_images()
        return self._n_images

    # -- the query head (cbir train) ---------------------------------------------------------

    def set_query_head(self, matrix: npt.NDArray[np.float32] | None, provenance: dict) -> None:
        """Store a trained query head (d, d) with its provenance in one commit, replacing
        any; None removes it (cbir train --reset). Stored rows are not touched."""
        d = self.settings.feature_dim
        if matrix is not None:
            matrix = np.asarray(matrix, np.float32)
            if matrix.shape != (d, d) or not np.isfinite(matrix).all():
                raise ValueError(f"a query head must be {d} x {d} finite numbers")
        self.catalog.set_query_head(matrix, provenance)

    # -- adding -----------------------------------------------------------------------------

    def record_engine(self, engine: str, precision: str) -> None:
        """Note which engine and precision computed features (saved with the next commit);
        a database extended with another one lists both, e.g. "openvino+tensorflow"."""
        s = self.db.manifest.settings
        self.db.manifest.settings = replace(
            s, engine=_merged(s.engine, engine), precision=_merged(s.precision, precision)
        )

    def lookup_path(self, path: str, size: int, mtime_ns: int) -> int | None:
        """The image id of an unchanged, already indexed file, else None."""
        rec = self.catalog.path_record(path)
        if rec is not None and rec.size == size and rec.mtime_ns == mtime_ns:
            return rec.image_id
        return None

    def has_image(self, sha256: str) -> bool:
        return self.catalog.has_image(image_id_of(sha256))

    def add_paths(self, entries: list[tuple[str, str, int, int]]) -> None:
        """Remember more source paths (path, sha256, size, mtime_ns) of images already indexed."""
        if entries:
            self._commit(paths=[(path, PathRecord(image_id_of(sha), size, mtime))
                                for path, sha, size, mtime in entries])  # fmt: skip

    def place_copies(self, images: Iterable[NewImage]) -> None:
        """Store the copies of described images ahead of their commit, so that copying
        overlaps with describing the next ones. Until committed they are orphans, which the
        repair after a crash removes; `add_images` keeps copies already placed."""
        for img in images:
            with contextlib.suppress(FileNotFoundError):  # source gone: add_images drops it
                self._place(img)

    def add_images(self, new: list[NewImage]) -> None:
        """Store a chunk of new images and commit it (see the module docstring for the order)."""
        if not self._adding:  # a writer that adds keeps more of the catalog in memory (not
            self.catalog.keep_pages(ADDING_CACHE_MIB)  # cbir check: it stays below a query)
            self._adding = True
        unique: dict[int, NewImage] = {}
        for img in new:
            if img.image_id not in unique and not self.catalog.has_image(img.image_id):
                unique[img.image_id] = img
        placed: list[NewImage] = []
        for img in unique.values():
            try:
                self._place(img)
            except FileNotFoundError:  # deleted since it was read: not indexed
                self._pending_removals.update(img.wnids)  # the commit drops copies made
                continue
            placed.append(img)
        if not placed:
            return
        dim = self.settings.feature_dim
        features = np.stack([i.feature for i in placed]).astype(np.float32).reshape(-1, dim)
        first_row = self._matrix_appender().append(features)
        rows = {img.image_id: first_row + n for n, img in enumerate(placed)}
        # images join the new rows until the lists cover them (cbir.db.ivf)
        new_list = None if self.catalog.ivf_state()[0] == 0 else ivf.NEW_ROWS
        os.sync()  # the copies and the matrix rows are durable before the commit point
        self._commit(
            images=[ImageRecord(i.image_id, i.sha256, stored_name(i.source_path, i.sha256),
                                i.wnids, i.probs, rows[i.image_id], new_list,
                                encode_classes(i.top_classes, i.top_probs))
                    for i in placed],
            paths=[(str(i.source_path), PathRecord(i.image_id, i.size, i.mtime_ns))
                   for i in placed],
            matrix_rows=self._matrix_appender().next_row,
        )  # fmt: skip
        self._unrecorded += len(placed)
        if self._unrecorded >= self.record_every:
            self.record_categories()
        self.train_ivf_if_due()

    def record_categories(self, after_crash: bool = False) -> None:
        """Write the category files' rows of the images committed since they were last
        written (matrix rows from the catalog's `recorded_rows` on): one new segment per
        category, then merges. The catalog then records that they are written.

        Category files are the per-folder record, not what queries read, so they are written
        every `record_every` images and at the end of a run rather than at every commit: a
        commit of 1024 images touches up to 1000 categories, and a segment per category per
        commit cost 15 s per commit on a 1000-category database. After a crash (`after_crash`)
        rows already written before the catalog said so are not written twice."""
        if after_crash:
            self._live.clear()
        recorded = self.catalog.recorded_rows()
        _, committed = self.catalog.matrix_state()
        if recorded >= committed:
            self._unrecorded = 0
            return
        records = self.catalog.images_from_row(recorded)
        features = self.db.matrix().gather(np.array([r.row for r in records], np.int64))
        by_wnid: dict[str, list[int]] = {}
        for n, record in enumerate(records):
            for wnid in record.wnids:
                by_wnid.setdefault(wnid, []).append(n)

        written: list[tuple[Path, Segment]] = []

        def new_segments() -> Iterator[tuple[Path, Callable]]:
            for wnid, members in sorted(by_wnid.items()):
                folder = self.db.category_dir(wnid)
                if after_crash:
                    present = self._ids_in(folder)
                    members = [n for n in members if records[n].image_id not in present]
                    if not members:
                        continue
                _make_folder_if_missing(folder)
                live = self._live_segments(folder)  # stale ones lie inside a live one's range
                seq = (live[-1][0].hi if live else 0) + 1
                chosen = [records[n] for n in members]
                added = CategoryRows(
                    np.array([r.image_id for r in chosen], np.int64),
                    np.array([r.stored_name for r in chosen], np.str_),
                    np.array([r.probs[r.wnids.index(wnid)] for r in chosen], np.float32),
                    features[members].astype(np.float16),
                )
                path = folder / f"features.{seq}-{seq}.npz"
                written.append((folder, Segment(path, seq, seq)))
                yield path, added.writer()

        with self._forgetting_on_error():
            write_many_atomic(new_segments())
            for folder, seg in written:
                self._live[folder].append((seg, seg.path.stat().st_size))
        self.catalog.set_recorded_rows(committed)
        self._unrecorded = 0
        self._merge_segments(sorted(by_wnid))

    def forget_segments(self, folder: Path) -> None:
        """Say that something besides this writer's writes changed a folder's segments."""
        self._live.pop(folder, None)

    def _live_segments(self, folder: Path) -> list[tuple[Segment, int]]:
        """A folder's live segments, oldest first, with their sizes in bytes (see _live)."""
        if folder not in self._live:
            self._live[folder] = [(seg, seg.path.stat().st_size) for seg in segments(folder)[0]]
        return self._live[folder]

    @contextlib.contextmanager
    def _forgetting_on_error(self) -> Iterator[None]:
        """Forget every folder's segments if the block fails half-way (a full disk, say):
        the next write lists the folders again."""
        try:
            yield
        except BaseException:
            self._live.clear()
            raise

    def _ids_in(self, folder: Path) -> set[int]:
        """Ids of every row of a folder's live segments (only the ids column is read)."""
        found: set[int] = set()
        for seg in segments(folder)[0]:
            found.update(load_npz(seg.path, ("ids",))["ids"].tolist())
        return found

    def train_ivf_if_due(self) -> None:
        """Train the inverted file once the database is large enough for it, and again when
        it has grown RETRAIN_GROWTH-fold since (rare: the cost is amortised over the adds);
        in between, cover the new rows once there are more than ivf.new_rows_limit."""
        generation, trained = self.catalog.ivf_state()
        n = self.n_images()
        if n >= ivf.IVF_MIN_IMAGES and (generation == 0 or n >= ivf.RETRAIN_GROWTH * trained):
            self.train_ivf()
        elif generation and self.catalog.count_in_list(ivf.NEW_ROWS) > ivf.new_rows_limit(n):
            self.cover_new_rows()

    def cover_new_rows(self, seed: int = 1234) -> None:
        """Put the new rows in lists (ivf.InvertedFile.cover): the grown inverted file is
        written as the next generation, then their lists and that generation are committed
        in one transaction, so a crash in between leaves the last generation in use (and an
        orphan file the next writer deletes). Costs in proportion to the new rows: k-means
        among at most ivf.NEW_ROWS_MAX rows, nothing read of the others."""
        generation, trained = self.catalog.ivf_state()
        inverted = self.db.ivf()
        assert inverted is not None
        rows = self.catalog.rows_of_lists([ivf.NEW_ROWS])
        list_size = max(1, self.n_images() // len(inverted))
        grown, lists = inverted.cover(self.db.matrix().gather(rows), list_size, seed)
        grown.write(self.db_dir / ivf.IVF_FILES.name(generation + 1))
        self.catalog.set_lists(zip(rows.tolist(), lists.tolist(), strict=True), generation + 1,
                               trained, only_these=True)  # fmt: skip
        self._delete_other_generations(ivf.IVF_FILES, generation + 1)

    def train_ivf(self, seed: int = 1234) -> None:
        """k-means on a sample of the live rows centred on the database's mean; every image
        goes to its nearest list, and those that fit none as well as 95 % of the sample fit
        theirs get lists of their own (ivf.InvertedFile.with_lists_for: a small kind among a
        large one would otherwise be spread over lists of the other). Written as the next IVF
        generation, then every image's list set with that generation in one transaction."""
        generation, _ = self.catalog.ivf_state()
        ids, rows = self.catalog.all_rows()
        matrix = self.db.matrix()
        n_lists = ivf.n_lists_for(len(rows))
        rng = np.random.default_rng(seed)
        sample_size = min(len(rows), n_lists * ivf.TRAIN_POINTS_PER_LIST)
        sample = np.sort(rng.choice(rows, sample_size, replace=False))
        centre = self.db.centre()
        mean = np.zeros(self.settings.feature_dim, np.float32) if centre is None else centre.mean
        inverted = ivf.InvertedFile.train(matrix.gather(sample), mean, n_lists, seed)
        lists = np.empty(len(rows), np.int64)
        fits = np.empty(len(rows), np.float32)
        block = 16384
        for start in range(0, len(rows), block):
            part = rows[start : start + block]
            fits[start : start + block], lists[start : start + block] = \
                inverted.assign(matrix.gather(part))  # fmt: skip
        unfit = np.flatnonzero(fits < inverted.fit)
        if len(unfit):
            inverted, lists[unfit] = inverted.with_lists_for(
                matrix.gather(rows[unfit]), max(1, len(rows) // n_lists), seed)  # fmt: skip
        inverted.write(self.db_dir / ivf.IVF_FILES.name(generation + 1))
        self.catalog.set_lists(zip(rows.tolist(), lists.tolist(), strict=True), generation + 1,
                               len(rows))  # fmt: skip
        self._delete_other_generations(ivf.IVF_FILES, generation + 1)

    def _delete_other_generations(self, files: GenerationFiles, current: int) -> None:
        """Delete the files of `files`' kind other than generation `current` (the one the
        catalog says is in use)."""
        for name in os.listdir(self.db_dir):
            gen = files.generation_of(name)
            if gen is not None and gen != current:
                (self.db_dir / name).unlink()

    def _matrix_appender(self) -> MatrixAppender:
        if self._appender is None:
            generation, committed = self.catalog.matrix_state()
            self._appender = MatrixAppender(self.db_dir / MATRIX_FILES.name(generation),
                                            self.settings.feature_dim, committed)  # fmt: skip
        return self._appender

    def _merge_segments(self, wnids: list[str]) -> None:
        """Merge each category's newest segments as `merge_tail` says."""
        merges: list[tuple[str, list[Segment], Segment]] = []  # (wnid, sources, target)
        for wnid in wnids:
            live = self._live_segments(self.db.category_dir(wnid))
            n = merge_tail([size for _, size in live])
            if n:
                tail = [seg for seg, _ in live[-n:]]
                path = tail[0].path.with_name(f"features.{tail[0].lo}-{tail[-1].hi}.npz")
                merges.append((wnid, tail, Segment(path, tail[0].lo, tail[-1].hi)))
        if not merges:
            return  # and no syncs
        dim = self.settings.feature_dim
        with self._forgetting_on_error():
            write_many_atomic(
                (target.path, merging_writer([s.path for s in tail], dim, self.db.members(wnid)))
                for wnid, tail, target in merges
            )
            for _, tail, target in merges:
                for seg in tail:
                    seg.path.unlink()
                live = self._live[target.path.parent]
                live[-len(tail) :] = [(target, target.path.stat().st_size)]

    def _place(self, img: NewImage) -> None:
        """Copy or link the image's source into each of its category folders; an existing
        entry is kept (its name holds the content hash, so it has the same content).

        With link="copy" the file is copied once and the other categories' entries are hard
        links to that copy: one file's disk space instead of k. Where the file system has no
        hard links, each entry is a full copy."""
        link, source = self.settings.link, img.source_path
        name = stored_name(source, img.sha256)
        placed: Path | None = None
        for target in (self.db.category_dir(w) / name for w in img.wnids):
            if target.parent not in self._folders:
                _make_folder(target.parent)
                self._folders.add(target.parent)
            with contextlib.suppress(FileExistsError):
                if link == "hardlink":
                    _hard_link(source, target, self.db_dir)
                elif link == "symlink":
                    os.symlink(source.resolve(), target)
                elif placed is None or not _try_link(placed, target):
                    _copy_new(source, target)
            placed = placed or target

    # -- removing ---------------------------------------------------------------------------

    def remove_paths(self, paths: Iterable[str]) -> int:
        """Forget source paths; images left with no path are removed. Returns images removed."""
        n_before = self.n_images()
        self._commit(forget=paths)
        self.compact_if_needed()
        return n_before - self.n_images()

    def compact_if_needed(self) -> None:
        """Rewrite the matrix without dead rows once they outnumber the live ones."""
        _, n_rows = self.catalog.matrix_state()
        dead = n_rows - self.n_images()
        if dead >= MIN_DEAD_ROWS and dead > self.n_images():
            self.compact()

    def compact(self) -> None:
        """Write the live rows, in their order, as the next generation's matrix file; one
        catalog transaction points every image at its new row; the old file goes."""
        self.record_categories()  # the category files then hold every image: rows may move
        ids, rows = self.catalog.all_rows()
        old, block = self.db.matrix(), 16384
        self.replace_matrix((ids[s : s + block], old.gather(rows[s : s + block]))
                            for s in range(0, len(rows), block))  # fmt: skip

    def replace_matrix(self, blocks: Iterator[tuple[npt.NDArray[np.int64], np.ndarray]]) -> None:
        """Write a new matrix from (ids (b,), features (b, d)) blocks and point the catalog's
        images at its rows (compaction, check --repair): every image must be in it."""
        generation, _ = self.catalog.matrix_state()
        new_rows: dict[int, int] = {}

        def features() -> Iterator[np.ndarray]:
            for ids, block in blocks:
                for image_id in ids.tolist():
                    new_rows[image_id] = len(new_rows)
                yield block

        n = write_matrix(self.db_dir / MATRIX_FILES.name(generation + 1), features(),
                         self.settings.feature_dim)  # fmt: skip
        self.catalog.move_rows(new_rows, generation + 1, n)
        if self._appender is not None:
            self._appender.close()
            self._appender = None
        self.db.close()  # the old matrix's map
        self._delete_other_generations(MATRIX_FILES, generation + 1)

    # -- committing -------------------------------------------------------------------------

    def _commit(
        self,
        images: Iterable[ImageRecord] = (),
        paths: Iterable[tuple[str, PathRecord]] = (),
        forget: Iterable[str] = (),
        matrix_rows: int | None = None,
    ) -> None:
        """Commit to the catalog (the commit point), then tidy what removals left behind and
        update the manifest."""
        n_before = self.n_images()
        done = self.catalog.commit(images, paths, forget, matrix_rows, self.features_of)
        self._n_images = n_before + done.added - done.dropped
        self._drop_copies(done.dropped_copies)
        if self._pending_removals:
            self._drop_uncommitted_rows(sorted(self._pending_removals))
            self._pending_removals.clear()
        self._write_manifest()

    def features_of(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """(r, d) stored features of matrix rows, committed or appended since (a commit's
        feature sums)."""
        generation, committed = self.catalog.matrix_state()
        n_rows = committed if self._appender is None else self._appender.next_row
        matrix = SearchMatrix(self.db_dir / MATRIX_FILES.name(generation),
                              self.settings.feature_dim, n_rows)  # fmt: skip
        try:
            return matrix.gather(rows)
        finally:
            matrix.close()

    def _write_manifest(self) -> None:
        self.db.manifest.n_images = self.n_images()
        self.db.manifest.updated = now_iso()
        write_manifest(self.db_dir, self.db.manifest)

    def category_folders(self) -> Iterator[tuple[str, Path]]:
        """(wnid, folder) of every category folder on disk, whether the catalog lists it."""
        for name in sorted(os.listdir(self.db_dir)):
            wnid = name.split("_", 1)[0]
            path = self.db_dir / name
            is_folder = path.is_dir() and not path.is_symlink()
            if categories.is_wnid(wnid) and name == categories.folder_name(wnid) and is_folder:
                yield wnid, path

    def _drop_copies(self, dropped: dict[str, dict[int, str]]) -> None:
        """Take images the catalog just dropped out of their category folders (wnid -> {image
        id: stored name}): their rows out of the segments that hold them, their copies
        deleted. Only these images are looked for, so a removal costs what it removes, not
        what its categories hold (a crash in between leaves files the next writer's repair
        sweeps)."""
        for wnid, gone in sorted(dropped.items()):
            folder = self.db.category_dir(wnid)
            if not folder.is_dir() or folder.is_symlink():
                continue
            ids = np.fromiter(gone, np.int64, len(gone))
            self._keep_segment_rows(folder, lambda held, ids=ids: ~np.isin(held, ids))
            for name in gone.values():
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
            self._remove_if_empty(folder)

    def _drop_uncommitted_rows(self, wnids: list[str] | None = None) -> None:
        """Remove segment rows, stored copies and leftovers the catalog does not list, in the
        categories `wnids` (None: every category folder)."""
        if wnids is None:
            folders = list(self.category_folders())
        else:
            folders = [(w, d) for w in wnids
                       if (d := self.db.category_dir(w)).is_dir() and not d.is_symlink()]
        for wnid, folder in folders:
            records = self.catalog.images_in(wnid)
            committed = np.array([r.image_id for r in records], np.int64)
            wanted = {r.stored_name for r in records}  # in segments or still to be written
            wanted |= self._keep_segment_rows(folder, lambda held, c=committed: np.isin(held, c))
            for entry in os.scandir(folder):  # stale segments, copies and temporary files go
                if entry.name not in wanted and not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.path)
            self._remove_if_empty(folder)

    def _keep_segment_rows(
        self, folder: Path,
        keep_of: Callable[[npt.NDArray[np.int64]], npt.NDArray[np.bool_]],
    ) -> set[str]:
        """Keep in each segment of `folder` the rows whose ids (n,) `keep_of` marks (n,) bool:
        only the small columns are read, a segment is rewritten (streaming its features) only
        when it loses rows, and deleted when it loses all. Returns the segments' names left."""
        self.forget_segments(folder)
        left = set()
        for seg in segments(folder)[0]:
            held = load_npz(seg.path, ("ids",))["ids"]
            keep = keep_of(held)
            if not keep.any():
                seg.path.unlink()
                continue
            if not keep.all():
                write_atomic(seg.path, merging_writer([seg.path], self.settings.feature_dim,
                                                      held[keep]))  # fmt: skip
            left.add(seg.path.name)
        return left

    def _remove_if_empty(self, folder: Path) -> None:
        self.forget_segments(folder)
        with contextlib.suppress(OSError):
            folder.rmdir()  # empty category folders go
            self._folders.discard(folder)

    def repair(self) -> None:
        """Bring the files back in line with the catalog after an interrupted write."""
        self._live.clear()
        for name in os.listdir(self.db_dir):
            if name.startswith(".tmp-"):
                (self.db_dir / name).unlink()
        generation, committed = self.catalog.matrix_state()
        self._delete_other_generations(MATRIX_FILES, generation)
        self._delete_other_generations(ivf.IVF_FILES, self.catalog.ivf_state()[0])
        if os.path.lexists(self.db_dir / MATRIX_FILES.name(generation)):
            self._matrix_appender()  # truncates rows past the committed ones
        elif committed == 0:
            write_matrix(self.db_dir / MATRIX_FILES.name(generation), iter(()),
                         self.settings.feature_dim)  # fmt: skip
        self._drop_uncommitted_rows()
        self.record_categories(after_crash=True)


def _merged(recorded: str, new: str) -> str:
    parts = [p for p in recorded.split("+") if p]
    return "+".join(parts if new in parts else [*parts, new])


def feature_sums_afresh(db: Database) -> dict[str, npt.NDArray[np.float64]]:
    """The feature sums of the committed images, from one pass over the matrix, a block of
    rows at a time (check, and a writer that finds them missing after a repair)."""
    return sum_features(db.catalog.rows_and_categories(), db.matrix().gather)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir()
    except FileExistsError:
        if folder.is_symlink() or not folder.is_dir():
            raise DatabaseError(f"{folder} is not a folder of this database (a link or a file); "
                                "run 'cbir check --repair'") from None  # fmt: skip


def _make_folder_if_missing(folder: Path) -> None:
    """A category folder, made if missing; a link in its place is refused (is_dir() follows
    links: segments were written into the link's target)."""
    if folder.is_symlink() or not folder.is_dir():
        _make_folder(folder)


def _hard_link(source: Path, target: Path, db_dir: Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise CbirError(
                f"cannot hard-link {source} into {db_dir}: different file systems; "
                "use --link copy or --link symlink"
            ) from exc
        raise


def _copy_new(source: Path, target: Path) -> None:
    """Copy to a temporary name and rename; FileExistsError when `target` is already there."""
    if os.path.lexists(target):
        raise FileExistsError(target)
    tmp = tmp_name(target)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _try_link(existing: Path, new: Path) -> bool:
    """Hard-link `new` to `existing`; False where the file system cannot (FAT, some shares)."""
    try:
        os.link(existing, new, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            return False
        raise
    return True


# -- opening ------------------------------------------------------------------------------


@contextlib.contextmanager
def open_writer(
    db_dir: Path,
    create: Settings | None = None,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
    repair_interrupted: bool = True,
) -> Iterator[Writer]:
    """Lock the database for writing. Where there is none yet, it is made with `create`'s
    settings; a database without a committed image takes `create`'s settings too (a first
    run that failed before indexing anything must not pin its choice of model).

    A second writer waits (calling `on_wait` once with a message) or, with wait=False, fails.
    The caller checks that the settings it needs match `writer.settings`.
    """
    db_dir = Path(db_dir)
    if not (db_dir / MANIFEST_NAME).exists():
        if create is None:
            read_manifest(db_dir)  # raises the right "no database" error
        _refuse_foreign_folder(db_dir)
        _make_dirs(db_dir)
    with _locked(db_dir, wait, on_wait):
        if not (db_dir / MANIFEST_NAME).exists():
            assert create is not None
            _create_database(db_dir, create)
        manifest = read_manifest(db_dir)
        db = Database(db_dir, manifest)
        if create is not None and manifest.settings != create and _is_empty(db):
            manifest.settings = create
            write_manifest(db_dir, manifest)
        writer = Writer(db)
        try:
            marker = db_dir / WRITING_NAME
            if not repair_interrupted:
                yield writer
                return
            if marker.exists():
                writer.repair()
            if not writer.catalog.has_feature_sums() and writer.n_images():
                writer.catalog.set_feature_sums(feature_sums_afresh(db))
            marker.touch()
            yield writer
            writer.record_categories()  # a run ends with its category files written
            marker.unlink()
        finally:
            writer.close()


def _is_empty(db: Database) -> bool:
    return db.catalog.n_images() == 0 and db.catalog.n_paths() == 0


def _refuse_foreign_folder(db_dir: Path) -> None:
    """A folder that exists and holds other files is not made into a database."""
    if not db_dir.exists():
        return
    if not db_dir.is_dir():
        raise DatabaseError(f"{db_dir} is a file, not a folder for a database")
    others = [n for n in os.listdir(db_dir)
              if n not in OWN_FILES and not n.startswith(".tmp-")
              and MATRIX_FILES.generation_of(n) is None
              and ivf.IVF_FILES.generation_of(n) is None]  # fmt: skip
    if others:
        raise DatabaseError(f"{db_dir} is a folder of other files ({others[0]}, ...), not a cbir "
                            "database: give a new or empty folder")  # fmt: skip


def _make_dirs(db_dir: Path) -> None:
    try:
        db_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(f"cannot create the database folder {db_dir} "
                            f"({exc.strerror or exc})") from exc  # fmt: skip


def _create_database(db_dir: Path, settings: Settings) -> None:
    """An empty database: catalog and matrix first, the manifest (which makes it one) last."""
    path = db_dir / CATALOG_NAME
    tmp = tmp_name(path)
    try:
        Catalog.create(tmp).close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    write_matrix(db_dir / MATRIX_FILES.name(1), iter(()), settings.feature_dim)
    fsync_dir(db_dir)
    write_manifest(db_dir, Manifest(settings, now_iso(), now_iso()))


@contextlib.contextmanager
def _locked(db_dir: Path, wait: bool, on_wait: Callable[[str], None] | None) -> Iterator[None]:
    try:
        fd = os.open(db_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        why = "it is read-only" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else (
            exc.strerror or str(exc))  # fmt: skip
        raise DatabaseError(f"cannot write to the database {db_dir}: {why}") from exc
    with open(fd, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = f"another cbir process is writing to {db_dir}"
            if not wait:
                raise DatabaseLocked(f"{message} (not waiting: --no-wait)") from None
            if on_wait is not None:
                on_wait(f"{message}; waiting for it to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_compatible(db_dir: Path, settings: Settings, backbone: str, weights: str) -> None:
    """Refuse to mix features of two models in one database or query."""
    if (settings.backbone, settings.weights) != (backbone, weights):
        raise DatabaseError(
            f"{db_dir} was built with --model {settings.backbone} --weights {settings.weights}, "
            f"not --model {backbone} --weights {weights}: features of different models cannot "
            f"be compared (use --model {settings.backbone}, or build a new database)"
        )
