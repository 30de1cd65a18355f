"""A category's rows live in segments: merging streams the features through in blocks, readers
are not disturbed by a writer merging, and a format-1 database is marked format 3 in time."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbir import store
from cbir.catalogdb import CatalogDB
from cbir.errors import DatabaseError
from cbir.store import (
    MANIFEST_NAME,
    CategoryRows,
    Database,
    NewImage,
    Settings,
    open_writer,
    read_category_file,
    read_category_folder,
)  # fmt: skip
from tests.legacy import to_format_1

DIM = 8
REPO = Path(__file__).resolve().parent.parent


def rows(ids: list[int], seed: int) -> CategoryRows:
    features = np.random.default_rng(seed).standard_normal((len(ids), DIM)).astype(np.float32)
    return CategoryRows(
        np.array(ids, np.int64),
        np.array([f"/photos/{'long/' * (i % 3)}{i}.jpg" for i in ids]),
        np.array([f"{i}-0123456789.jpg" for i in ids]),
        features,
    )


def write_segment(path, category_rows: CategoryRows) -> None:
    store._write_atomic(path, store._category_writer(category_rows))


@pytest.mark.parametrize(
    "n_old", [0, 1, store.FEATURE_BLOCK_ROWS, 2 * store.FEATURE_BLOCK_ROWS + 7]
)
def test_merging_keeps_committed_rows_in_segment_order(tmp_path, n_old):
    old = rows(list(range(n_old)), seed=1)
    added = rows([10_000 + i for i in range(3)], seed=2)
    write_segment(tmp_path / "features.1-1.npz", old)
    write_segment(tmp_path / "features.2-2.npz", added)
    committed = np.array([i for i in range(n_old) if i % 5 != 2] + [10_001], np.int64)

    sources = [tmp_path / "features.1-1.npz", tmp_path / "features.2-2.npz"]
    merged = tmp_path / "features.1-2.npz"
    store._write_atomic(merged, store._merging_writer(sources, DIM, committed))

    got = read_category_file(merged, DIM)
    both = store.CategoryRows.concatenate([old, added], DIM)
    keep = np.isin(both.ids, committed)
    np.testing.assert_array_equal(got.ids, both.ids[keep])
    np.testing.assert_array_equal(got.paths, both.paths[keep])
    np.testing.assert_array_equal(got.files, both.files[keep])
    np.testing.assert_array_equal(got.features, both.features[keep])
    # Until the merged-away files are deleted, they are stale: never read twice.
    live, stale = store.category_segments(tmp_path)
    assert [seg.path for seg in live] == [merged]
    assert sorted(seg.path for seg in stale) == sources


@pytest.mark.parametrize("damage", ["truncated", "corrupted in the middle"])
def test_merging_a_damaged_file_names_it_and_the_fix(tmp_path, damage):
    path = tmp_path / "features.1-1.npz"
    write_segment(path, rows(list(range(600)), seed=1))
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[-3000:]
    else:
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    write = store._merging_writer([path], DIM, np.arange(600))
    with pytest.raises(DatabaseError, match="features.1-1.npz is damaged.*cbir check --repair"):
        store._write_atomic(tmp_path / "features.1-2.npz", write)
    assert len(path.read_bytes()) == len(data)  # left as it was
    assert not (tmp_path / "features.1-2.npz").exists()


def test_merging_features_of_another_size_is_refused(tmp_path):
    path = tmp_path / "features.1-1.npz"
    write_segment(path, rows([1, 2], seed=1))
    write = store._merging_writer([path], DIM + 1, np.arange(3))
    with pytest.raises(DatabaseError, match=r"shape \(2, 8\).*expected \(2, 9\)"):
        store._write_atomic(tmp_path / "features.1-2.npz", write)


WNIDS = ("n01440764", "n01443537")  # tench, goldfish: every synthetic image is in both
SETTINGS = Settings("synthetic", "none", DIM, top_k=2)


def new_images(folder: Path, start: int, n: int) -> list[NewImage]:
    """n distinct tiny source files, described as if by a model."""
    folder.mkdir(exist_ok=True)
    images = []
    for i in range(start, start + n):
        path = folder / f"{i}.jpg"
        path.write_bytes(b"image %d" % i)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        feature = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
        info = path.stat()
        images.append(NewImage(path, sha, info.st_size, info.st_mtime_ns, WNIDS, (0.6, 0.3),
                               feature / np.linalg.norm(feature)))  # fmt: skip
    return images


READER = """
import sys
from pathlib import Path
from cbir.store import Database
db, wnid, stop = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
while not stop.exists():
    try:
        print(len(Database.open(db).read_category(wnid)), flush=True)
    except Exception as exc:  # any error is the failure
        print("error:", repr(exc), flush=True)
"""


def test_readers_are_not_disturbed_by_a_writer_merging_segments(tmp_path):
    db = tmp_path / "db"
    with open_writer(db, SETTINGS) as writer:
        writer.add_images(new_images(tmp_path / "src", 0, 5))
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(db), WNIDS[0], str(stop)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    try:
        with open_writer(db) as writer:
            for chunk in range(1, 80):  # every commit adds a segment, most merge
                writer.add_images(new_images(tmp_path / "src", 5 * chunk, 5))
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    lines = out.split()
    assert not [line for line in out.splitlines() if line.startswith("error")]
    counts = [int(n) for n in lines]
    assert len(set(counts)) > 5 and counts == sorted(counts)  # read while written; never a
    # row lost or doubled
    assert counts[-1] == 400 and len(read_category_folder(db / category_folder(db), DIM)) == 400


def category_folder(db: Path) -> str:
    return next(p.name for p in db.iterdir() if p.name.startswith(WNIDS[0]))


class Crash(Exception):
    pass


def test_a_format_1_database_says_format_3_before_its_first_segment(tmp_path, monkeypatch):
    """Its catalog.npz becomes catalog.sqlite and the manifest says 3 before anything new is
    written: an older cbir must refuse the database from then on, not miss the new files."""
    db = tmp_path / "db"
    with open_writer(db, SETTINGS) as writer:
        writer.add_images(new_images(tmp_path / "src", 0, 3))
    to_format_1(db)
    assert len(Database.open(db).catalog.images) == 3  # read as it is

    def crash(*args: object) -> None:
        raise Crash

    monkeypatch.setattr(CatalogDB, "commit", crash)  # killed at the commit point
    with pytest.raises(Crash), open_writer(db) as writer:
        writer.add_images(new_images(tmp_path / "src", 3, 1))
    assert any(p.name != store.FEATURES_NAME for p in db.glob("n*/features.*.npz"))
    assert json.loads((db / MANIFEST_NAME).read_text())["format_version"] == 3
    assert not (db / store.LEGACY_CATALOG_NAME).exists()
    assert len(Database.open(db).catalog.images) == 3
