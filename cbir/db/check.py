"""`cbir check [--repair]`: verify every file of a database against its catalog, one category
at a time (memory never holds more than one category's rows), and repair what can be rebuilt.

What rebuilds what: the search matrix is rebuilt from the category files (each holds its
images' features); a category file from the matrix; a stored copy from another copy or the
source file (only when its content hash matches); a damaged catalog from the category files
and stored copies (source paths live only in the catalog and are lost with it: running the
same create-db again re-attaches them). An image with nothing left to rebuild it from is
dropped, so that running the same create-db or add again re-indexes it. Repair never
writes outside the database folder and never follows a link out of it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cbir import categories
from cbir.db import ivf
from cbir.db.catalog import CATALOG_NAME, Catalog, ImageRecord, insert
from cbir.db.category_files import (
    CategoryRows,
    next_segment_number,
    read_folder,
    read_segment,
    segments,
)
from cbir.db.database import Database
from cbir.db.files import open_regular, tmp_name, write_atomic
from cbir.db.manifest import read_manifest
from cbir.db.matrix import MATRIX_FILES
from cbir.db.writer import (
    WRITING_NAME,
    Writer,
    _copy_new,
    _locked,
    feature_sums_afresh,
    open_writer,
)
from cbir.errors import DatabaseError
from cbir.hashing import image_id_of, stream_sha256

FEATURE_TOLERANCE = 2e-3  # float16 rounding is below 1e-3 for unit-norm features
COMPARE_ROWS = 1024  # a category's rows compared with the search matrix at a time (a few MB)


def check_database(
    db_dir: Path,
    repair: bool = False,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
) -> list[str]:
    """One line per problem found (with what was done about it when repairing). Without
    `repair` nothing is written, so read-only media can be checked."""
    db_dir = Path(db_dir)
    if not repair:
        manifest = read_manifest(db_dir)
        if not os.access(db_dir, os.W_OK):  # read-only media: nobody can be writing it
            with Database(db_dir, manifest) as db:
                return _Checker(db, None).run()
        with _locked(db_dir, wait, on_wait), Database(db_dir, manifest) as db:
            return _Checker(db, None).run()  # not while a writer is half-way
    with open_writer(db_dir, wait=wait, on_wait=on_wait, repair_interrupted=False) as writer:
        problems = _Checker(writer.db, writer).run()
        with contextlib.suppress(FileNotFoundError):
            (db_dir / WRITING_NAME).unlink()  # whatever it marked is repaired now
        return problems


class _Checker:
    def __init__(self, db: Database, writer: Writer | None) -> None:
        self.db, self.w, self.problems = db, writer, []
        self.dim = db.settings.feature_dim
        self.interrupted = (db.db_dir / WRITING_NAME).exists()
        self.quiet = False
        self.recorded = 0  # images of matrix rows below this are expected in category files
        self.sums_stale = False  # this repair dropped images without updating the feature sums

    def say(self, what: str, fix: str = "") -> None:
        if not self.quiet:
            self.problems.append(f"{what}; {fix}" if self.w is not None and fix else what)

    def leftover(self, path: Path) -> None:
        why = "an interrupted write, which the next write completes" if self.interrupted else (
            "a leftover of an interrupted write")  # fmt: skip
        self.say(f"{path} is {why}", "deleted")
        if self.w is not None:
            os.unlink(path)

    def run(self) -> list[str]:
        db = self.db
        try:
            db.catalog.matrix_state()
            db.catalog.n_images()
        except DatabaseError as exc:
            self.say(_first_part(exc), "rebuilt from the category files (source paths and "
                     "the query head are lost with it: run the same create-db again to "
                     "re-attach them, and cbir train)")  # fmt: skip
            if self.w is None:
                return self.problems
            self._rebuild_catalog()
        self._check_catalog_fields()
        for name in sorted(os.listdir(db.db_dir)):
            if name.startswith(".tmp-") or (
                MATRIX_FILES.generation_of(name) is not None
                and MATRIX_FILES.generation_of(name) != db.catalog.matrix_state()[0]
            ) or (
                ivf.IVF_FILES.generation_of(name) is not None
                and ivf.IVF_FILES.generation_of(name) != db.catalog.ivf_state()[0]
            ):
                self.leftover(db.db_dir / name)
        matrix_ok = self._check_matrix()
        if not matrix_ok and self.w is not None:
            self._rebuild_matrix()
            matrix_ok = True
        self.recorded = db.catalog.recorded_rows()
        unrecorded = db.catalog.count_from_row(self.recorded)
        if unrecorded:
            self.say(f"{unrecorded} committed images are not in their category files yet (a run "
                     "was interrupted; its next write completes them)", "written")  # fmt: skip
            if self.w is not None and matrix_ok:
                self.w.record_categories(after_crash=True)
                self.recorded = db.catalog.recorded_rows()
        self._check_ivf()
        lost: set[int] = set()
        listed = set(db.catalog.category_sizes(known_only=True))
        for wnid in sorted(listed | set(self._folders_on_disk())):
            lost |= self._check_category(wnid, matrix_ok)
        if lost and self.w is not None:
            self.say(f"{len(lost)} images have no stored copy or source file left",
                     "dropped: run the same create-db or add again to re-index them")  # fmt: skip
            done = db.catalog.drop_images(sorted(lost), self.w.features_of if matrix_ok else None)
            self.sums_stale |= not matrix_ok
            self.quiet = True  # their other categories lose their rows too: not new problems
            for wnid in sorted(done.dropped_from):
                self._check_category(wnid, matrix_ok)
            self.quiet = False
        if matrix_ok:
            self._check_feature_sums()
        self._check_query_head()
        n = db.catalog.n_images()
        if db.manifest.n_images != n:
            self.say(f"manifest counts {db.manifest.n_images} images, the catalog {n}",
                     "corrected")  # fmt: skip
            if self.w is not None:
                self.w._n_images = None
                self.w._write_manifest()
        return self.problems

    def _check_catalog_fields(self) -> None:
        """Entries whose names or categories are not valid are never used: they could name a
        file outside the database. Repair drops them (their content is re-indexed by running
        the same create-db again)."""
        catalog = self.db.catalog
        unknown = catalog.unknown_categories()
        if unknown:
            self.say(f"{self.db.db_dir / CATALOG_NAME} names {len(unknown)} categories that are "
                     f"not ImageNet classes ({unknown[0][:40]!r}...)", "forgotten")  # fmt: skip
            if self.w is not None:
                catalog.forget_categories(unknown)
        misplaced = catalog.misplaced_rows()
        if misplaced:
            self.say(f"{self.db.db_dir / CATALOG_NAME} has {misplaced} placements that disagree "
                     "with their images' rows", "given their images' rows")  # fmt: skip
            if self.w is not None:
                catalog.mend_placements()
        bad = catalog.invalid_images()
        if bad:
            self.say(f"{self.db.db_dir / CATALOG_NAME} has {len(bad)} images with invalid "
                     "fields (a stored name with '/', an unknown category, a bad hash)",
                     "dropped: run the same create-db or add again to re-index them")  # fmt: skip
            if self.w is not None:
                catalog.drop_images(bad, None)
                self.sums_stale = True  # the matrix is checked after this

    # -- the search matrix ------------------------------------------------------------------

    def _check_matrix(self) -> bool:
        try:
            matrix = self.db.matrix()
        except DatabaseError as exc:
            self.say(_first_part(exc), "rebuilt from the category files")
            return False
        ids, rows = self.db.catalog.all_rows()
        if len(rows) and rows.max() >= matrix.n_rows:
            self.say(f"the catalog points past the {matrix.n_rows} rows of {matrix.path}",
                     "rebuilt from the category files")  # fmt: skip
            return False
        return True

    def _check_feature_sums(self) -> None:
        """The catalog's feature sums equal sums made afresh from the matrix (one pass over
        it, a block of rows at a time)."""
        catalog = self.db.catalog
        try:
            stored = catalog.feature_sums(self.dim) if catalog.has_feature_sums() else None
            if stored is None and catalog.n_images() and not self.sums_stale:
                self.say(f"{self.db.db_dir / CATALOG_NAME} has no feature sums (a repair "
                         "was interrupted)", "summed afresh")  # fmt: skip
        except DatabaseError as exc:
            self.say(_first_part(exc), "summed afresh")
            stored = None
        fresh = feature_sums_afresh(self.db)
        if stored is not None and _same_sums(stored, fresh):
            return
        if stored is not None and not self.sums_stale:
            self.say(f"{self.db.db_dir / CATALOG_NAME} has feature sums that disagree with the "
                     "search matrix", "summed afresh")  # fmt: skip
        if self.w is not None:
            catalog.set_feature_sums(fresh)

    def _check_query_head(self) -> None:
        """A stored query head is d x d finite numbers with a provenance; anything else is
        removed (queries are then plain centred ones until 'cbir train' runs again)."""
        try:
            self.db.catalog.query_head(self.dim)
        except DatabaseError as exc:
            self.say(_first_part(exc), "removed: run 'cbir train' again")
            if self.w is not None:
                self.w.set_query_head(None, {})

    def _check_ivf(self) -> None:
        """The inverted file in use is readable and lists every image; a database large
        enough for one has one (one grown by an older cbir may not)."""
        generation, _ = self.db.catalog.ivf_state()
        if generation == 0:
            n = self.db.n_images()
            if n >= ivf.IVF_MIN_IMAGES:
                self.say(f"the database holds {n} images and no inverted file, so gated "
                         "queries search whole categories", "trained")  # fmt: skip
                if self.w is not None:
                    self.w.train_ivf()
            return
        try:
            centroids = self.db.ivf()
            assert centroids is not None
            unlisted = self.db.catalog.unlisted(len(centroids))
            if not unlisted:
                return
            self.say(f"{unlisted} images are in no list of the inverted file", "retrained")
        except DatabaseError as exc:
            self.say(_first_part(exc), "retrained")
        if self.w is not None:
            self.w.train_ivf()

    def _rebuild_matrix(self) -> None:
        """Every image's feature from the first category file that holds it, in id order of
        the categories (one category's rows in memory at a time)."""
        assert self.w is not None
        done: set[int] = set()
        lost: list[int] = []
        catalog_ids = {r.image_id for r in self.db.images()}

        def blocks() -> Iterator[tuple[npt.NDArray[np.int64], np.ndarray]]:
            for wnid in sorted(self.db.catalog.category_sizes(known_only=True)):
                try:
                    rows = read_folder(self.db.category_dir(wnid), self.dim)
                except (FileNotFoundError, DatabaseError):
                    continue
                keep = np.array([i in catalog_ids and i not in done for i in rows.ids.tolist()],
                                bool)  # fmt: skip
                _, first = np.unique(rows.ids[keep], return_index=True)
                ids, features = rows.ids[keep][first], rows.features[keep][first]
                done.update(ids.tolist())
                yield ids, features

        def drop_lost() -> None:  # before the catalog points at the new rows
            lost.extend(sorted(catalog_ids - done))
            if lost:
                self.say(f"{len(lost)} images have no feature left in any category file",
                         "dropped: run the same create-db or add again to re-index them")
                self.db.catalog.drop_images(lost, None)
                self.sums_stale = True

        self.w.replace_matrix(blocks_with_end(blocks(), drop_lost))

    # -- one category -----------------------------------------------------------------------

    def _folders_on_disk(self) -> list[str]:
        found = []
        for name in os.listdir(self.db.db_dir):
            wnid = name.split("_", 1)[0]
            path = self.db.db_dir / name
            if categories.is_wnid(wnid) and name == categories.folder_name(wnid):
                if path.is_symlink() or not path.is_dir():
                    self.say(f"{path} is not a folder (a link or a file)", "deleted")
                    if self.w is not None:
                        path.unlink()
                    continue
                found.append(wnid)
            elif name.startswith("n") and "_" in name and path.is_dir():
                self.say(f"{path} is not a folder of any category", "left alone")
        return found

    def _check_category(self, wnid: str, matrix_ok: bool) -> set[int]:
        """Checks (and repairs) one category; returns the images it found beyond repair."""
        db = self.db
        folder = db.category_dir(wnid)
        records = db.catalog.images_in(wnid, skip_invalid=True)
        by_id = {r.image_id: r for r in records}
        expected = {r.image_id for r in records if r.row < self.recorded}
        rows = None
        rewrite = differ = False
        try:
            rows, differ = self._read_and_compare(folder, by_id if matrix_ok else None)
        except FileNotFoundError:
            if expected:
                self.say(f"{folder} has no features file", "rebuilt from the search matrix")
                rewrite = True
        except DatabaseError as exc:
            self.say(_first_part(exc), "rebuilt from the search matrix")
            rewrite = True
        if rows is not None:
            listed = np.isin(rows.ids, list(by_id))
            if not listed.all():
                strays = int((~listed).sum())
                self.say(f"{folder} has {strays} feature rows of images the catalog does not "
                         "list there (an interrupted write)", "removed")  # fmt: skip
                rewrite = True
            names = [by_id[i].stored_name for i in rows.ids[listed].tolist()]
            if rows.files[listed].tolist() != names:
                self.say(f"{folder}: the file names of its feature rows disagree with the "
                         "catalog", "rewritten from the catalog")  # fmt: skip
                rewrite = True
            missing = expected - set(rows.ids.tolist())
            if missing:
                self.say(f"{folder} lacks the feature rows of {len(missing)} images",
                         "restored from the search matrix")  # fmt: skip
                rewrite = True
            if differ and not rewrite:
                self.say(f"{folder}: features differ from the search matrix",
                         "rewritten from the search matrix")  # fmt: skip
                rewrite = True
        for seg in segments(folder)[1]:
            self.leftover(seg.path)
        lost = self._check_copies(folder, records)
        if self.w is None:
            return lost
        records = [r for r in records if r.image_id not in lost]
        if rewrite and matrix_ok:
            self._write_category(wnid, records)
        self._tidy_folder(folder, records)
        return lost

    def _read_and_compare(
        self, folder: Path, by_id: dict[int, ImageRecord] | None
    ) -> tuple[CategoryRows, bool]:
        """A folder's rows, oldest first, without their features (r, 0), and whether any row
        of an image in `by_id` differs from its search-matrix row (None: not compared).
        Streamed a segment, and COMPARE_ROWS rows of it, at a time: a large category's
        features at once, as float32 and twice, were most of check's memory. Raises
        FileNotFoundError when the folder has no segment, DatabaseError for a damaged one."""
        live, _ = segments(folder)
        if not live:
            raise FileNotFoundError(folder / "features.*.npz")
        parts, differ = [], False
        for seg in live:
            part = read_segment(seg.path, self.dim)
            if by_id is not None and not differ:
                which = np.flatnonzero(np.isin(part.ids, list(by_id)))
                rows = np.array([by_id[i].row for i in part.ids[which].tolist()], np.int64)
                for start in range(0, len(which), COMPARE_ROWS):
                    block = slice(start, start + COMPARE_ROWS)
                    stored = part.features[which[block]].astype(np.float32)
                    gap = np.abs(np.subtract(stored, self.db.matrix().gather(rows[block]),
                                             out=stored), out=stored)  # fmt: skip
                    differ = differ or gap.max() > FEATURE_TOLERANCE
            parts.append(CategoryRows(part.ids, part.files, part.probs,
                                      np.zeros((len(part), 0), np.float16)))  # fmt: skip
        return CategoryRows.concatenate(parts, 0), differ

    def _check_copies(self, folder: Path, records: list[ImageRecord]) -> set[int]:
        """Each image's stored copy in `folder`: present, and a regular file inside the
        database (a link only where the database stores links). Returns images that have no
        copy left anywhere and no source file with their content."""
        lost = set()
        link = self.db.settings.link
        for rec in records:
            target = folder / rec.stored_name
            try:
                info = os.lstat(target)
            except FileNotFoundError:
                info = None
            kind_ok = info is not None and (
                stat.S_ISLNK(info.st_mode) if link == "symlink" else stat.S_ISREG(info.st_mode)
            )
            if kind_ok:
                continue
            what = "is missing" if info is None else (
                "is a link, not a stored copy" if stat.S_ISLNK(info.st_mode)
                else "is not a regular file")  # fmt: skip
            self.say(f"{target} {what}", "copied again")
            if self.w is None:
                continue
            if info is not None and not stat.S_ISDIR(info.st_mode):
                os.unlink(target)
            if not self._restore_copy(rec, target):
                lost.add(rec.image_id)
        return lost

    def _restore_copy(self, rec: ImageRecord, target: Path) -> bool:
        """Copy an image's content into `target` from a verified copy or source file."""
        if self.db.settings.link == "symlink":
            for source in self.db.paths_of(rec.image_id):
                if _has_content(Path(source), rec.sha256, follow=True):
                    os.symlink(Path(source).resolve(), target)
                    return True
            return False
        candidates = [self.db.category_dir(w) / rec.stored_name for w in rec.wnids]
        candidates += [Path(p) for p in self.db.paths_of(rec.image_id)]
        for source in candidates:
            if source != target and _has_content(source, rec.sha256, follow=False):
                _copy_new(source, target)
                return True
        return False

    def _write_category(self, wnid: str, records: list[ImageRecord]) -> None:
        """The category's rows as one new segment from the matrix, replacing all others."""
        folder = self.db.category_dir(wnid)
        assert self.w is not None
        self.w.forget_segments(folder)
        if not records:  # nothing is left in it: its segments go, and the folder
            for seg in sum(segments(folder), []):
                os.unlink(seg.path)
            return
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
        features = self.db.matrix().gather(np.array([r.row for r in records], np.int64))
        rows = CategoryRows(
            np.array([r.image_id for r in records], np.int64),
            np.array([r.stored_name for r in records], np.str_),
            np.array([r.probs[r.wnids.index(wnid)] for r in records], np.float32),
            features.astype(np.float16),
        )
        live, stale = segments(folder)
        write_atomic(folder / f"features.0-{next_segment_number(folder)}.npz", rows.writer())
        for seg in live + stale:
            os.unlink(seg.path)

    def _tidy_folder(self, folder: Path, records: list[ImageRecord]) -> None:
        """Delete files in a category folder that nothing lists: orphan copies, temporaries."""
        if not folder.is_dir():
            return
        assert self.w is not None
        self.w.forget_segments(folder)
        wanted = {r.stored_name for r in records} | {s.path.name for s in segments(folder)[0]}
        for entry in os.scandir(folder):
            if entry.name in wanted or entry.is_dir(follow_symlinks=False):
                continue
            self.say(f"{entry.path} is not listed by the catalog", "deleted")
            os.unlink(entry.path)
        if not records:
            with contextlib.suppress(OSError):
                folder.rmdir()

    # -- the catalog ------------------------------------------------------------------------

    def _rebuild_catalog(self) -> None:
        """A new catalog from the category files: each image's categories (ordered by their
        stored probability) and stored name, its hash from a stored copy that still has it."""
        assert self.w is not None
        found: dict[int, dict] = {}
        for wnid in self._folders_on_disk():
            folder = self.db.category_dir(wnid)
            try:
                rows = read_folder(folder, self.dim)
            except (FileNotFoundError, DatabaseError):
                continue
            for image_id, name, prob in zip(rows.ids.tolist(), rows.files.tolist(),
                                            rows.probs.tolist(), strict=True):  # fmt: skip
                entry = found.setdefault(image_id, {"name": name, "wnids": [], "sha": None})
                entry["wnids"].append((prob, wnid))
                if entry["sha"] is None and entry["name"] == name:
                    entry["sha"] = _sha_of_copy(folder / name, image_id)
        records = []
        for row, (image_id, entry) in enumerate(sorted(found.items())):
            if entry["sha"] is None or not _valid_name(entry["name"]):
                continue
            ordered = sorted(entry["wnids"], key=lambda pw: -pw[0])
            records.append(ImageRecord(image_id, entry["sha"], entry["name"],
                                       tuple(w for _, w in ordered),
                                       tuple(p for p, _ in ordered), row))  # fmt: skip
        path = self.db.db_dir / CATALOG_NAME
        tmp = tmp_name(path)
        new = Catalog.create(tmp)
        with new.transaction() as conn:
            insert(conn, records, [])
        new.close()
        self.db.close()
        os.replace(tmp, path)
        self.sums_stale = True  # the new catalog has none: summed at the end
        self.w._n_images = None


def blocks_with_end(blocks: Iterator, at_end: Callable[[], None]) -> Iterator:
    """`blocks`, then a call of `at_end` once they are exhausted."""
    yield from blocks
    at_end()


def _same_sums(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Whether two sets of feature sums agree (an empty category's sum may be absent)."""
    keys = {k for k, v in a.items() if v.any()} | {k for k, v in b.items() if v.any()}
    zero = np.zeros(0)
    return all(np.allclose(a.get(k, zero), b.get(k, zero), rtol=0, atol=1e-6)
               if k in a and k in b else False for k in keys)


def _first_part(exc: Exception) -> str:
    return str(exc).split("; run")[0]


def _valid_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\x00" not in name and not name.startswith(".")


def _regular_sha256(path: Path, follow: bool) -> str | None:
    """The SHA-256 of `path` if it is a regular file (not a link unless `follow`), else None."""
    try:
        fd = os.open(path, os.O_RDONLY) if follow else open_regular(path)
    except OSError:
        return None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return stream_sha256(f)


def _has_content(path: Path, sha256: str, follow: bool) -> bool:
    """Whether `path` is a regular file (not a link unless `follow`) with this SHA-256."""
    return _regular_sha256(path, follow) == sha256


def _sha_of_copy(path: Path, image_id: int) -> str | None:
    """The SHA-256 of a stored copy (a regular file, no link) if it is image `image_id`'s."""
    sha = _regular_sha256(path, follow=False)
    return sha if sha is not None and image_id_of(sha) == image_id else None

