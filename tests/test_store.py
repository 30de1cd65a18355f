"""The v2 store on synthetic features written through the real writer: category segments
merge without losing rows, readers are not disturbed by a writer, the search matrix holds each
image once and survives removals (compaction), and other formats are refused."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cbir.db import MANIFEST_NAME, Database, NewImage, Settings, category_files, open_writer
from cbir.db import check as check_module
from cbir.db import writer as writer_module
from cbir.db.category_files import (
    FEATURE_BLOCK_ROWS,
    SEALED_BYTES,
    CategoryRows,
    merge_tail,
    merging_writer,
    read_folder,
    read_segment,
    segments,
)
from cbir.db.check import check_database
from cbir.db.files import write_atomic
from cbir.errors import DatabaseError
from cbir.query import exhaustive
from tests.reference import definition

DIM = 8
REPO = Path(__file__).resolve().parent.parent
WNIDS = ("n01440764", "n01443537")  # tench, goldfish: every synthetic image is in both
SETTINGS = Settings("synthetic", "none", DIM, top_k=2)


def rows(ids: list[int], seed: int) -> CategoryRows:
    features = np.random.default_rng(seed).standard_normal((len(ids), DIM))
    return CategoryRows(
        np.array(ids, np.int64),
        np.array([f"{i}-0123456789.jpg" for i in ids]),
        np.full(len(ids), 0.5, np.float32),
        features.astype(np.float16),
    )


@pytest.mark.parametrize("n_old", [0, 1, FEATURE_BLOCK_ROWS, 2 * FEATURE_BLOCK_ROWS + 7])
def test_merging_keeps_committed_rows_in_segment_order(tmp_path, n_old):
    old = rows(list(range(n_old)), seed=1)
    added = rows([10_000 + i for i in range(3)], seed=2)
    write_atomic(tmp_path / "features.1-1.npz", old.writer())
    write_atomic(tmp_path / "features.2-2.npz", added.writer())
    committed = np.array([i for i in range(n_old) if i % 5 != 2] + [10_001], np.int64)

    sources = [tmp_path / "features.1-1.npz", tmp_path / "features.2-2.npz"]
    merged = tmp_path / "features.1-2.npz"
    write_atomic(merged, merging_writer(sources, DIM, committed))

    got = read_segment(merged, DIM)
    both = CategoryRows.concatenate([old, added], DIM)
    keep = np.isin(both.ids, committed)
    for column in ("ids", "files", "probs", "features"):
        np.testing.assert_array_equal(getattr(got, column), getattr(both, column)[keep])
    # Until the merged-away files are deleted, they are stale: never read twice.
    live, stale = segments(tmp_path)
    assert [seg.path for seg in live] == [merged]
    assert sorted(seg.path for seg in stale) == sources


@pytest.mark.parametrize("damage", ["truncated", "corrupted in the middle"])
def test_merging_a_damaged_file_names_it_and_the_fix(tmp_path, damage):
    path = tmp_path / "features.1-1.npz"
    write_atomic(path, rows(list(range(600)), seed=1).writer())
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[-3000:]
    else:
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(DatabaseError, match="features.1-1.npz is damaged.*cbir check --repair"):
        write_atomic(tmp_path / "features.1-2.npz", merging_writer([path], DIM, np.arange(600)))
    assert len(path.read_bytes()) == len(data)  # left as it was
    assert not (tmp_path / "features.1-2.npz").exists()


def test_a_segment_of_another_feature_size_is_refused(tmp_path):
    path = tmp_path / "features.1-1.npz"
    write_atomic(path, rows([1, 2], seed=1).writer())
    with pytest.raises(DatabaseError, match="damaged"):
        read_segment(path, DIM + 1)
    with pytest.raises(DatabaseError, match=r"shape \(2, 8\).*expected \(2, 9\)"):
        write_atomic(tmp_path / "features.1-2.npz", merging_writer([path], DIM + 1, np.arange(3)))


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
from cbir.db import Database
db, wnid, stop = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
while True:
    last = stop.exists()  # one more read after the writer has finished
    try:
        with Database.open(db) as d:
            rows = d.catalog.rows_of_categories([wnid])
            features = d.matrix().gather(rows)
            assert len(set(rows.tolist())) == len(rows) == len(features)
            print(len(features), flush=True)
    except Exception as exc:  # any error is the failure
        print("error:", repr(exc), flush=True)
    if last:
        break
"""


def test_readers_are_not_disturbed_by_a_writer_appending_and_merging(tmp_path):
    db = tmp_path / "db"
    with open_writer(db, SETTINGS) as writer:
        writer.add_images(new_images(tmp_path / "src", 0, 5))
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(db), WNIDS[0], str(stop)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    try:
        with open_writer(db) as writer:
            for chunk in range(1, 80):  # every commit appends rows and a segment; most merge
                writer.add_images(new_images(tmp_path / "src", 5 * chunk, 5))
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    assert not [line for line in out.splitlines() if line.startswith("error")], out[:2000]
    counts = [int(n) for n in out.split()]
    assert len(set(counts)) > 5 and counts == sorted(counts)  # read while written; never a
    # row lost or doubled
    folder = next(p for p in db.iterdir() if p.name.startswith(WNIDS[0]))
    assert counts[-1] == 400 and len(read_folder(folder, DIM)) == 400


@pytest.mark.parametrize("record_bytes", [3_000, 160_000, 600_000, 2_000_000])
def test_a_row_is_merged_at_most_three_times_however_large_its_category_grows(record_bytes):
    """Writes of the category files of one size (a row: 2.5 kB at 1280 features) follow the
    merge policy for 2000 writes: a row is rewritten at most once per size class below the
    sealed size, a sealed segment is never merged, and a folder keeps a few unsealed files."""
    live: list[tuple[int, list[int]]] = []  # (bytes, the writes whose rows it holds)
    merges_of = [0] * 2000
    for write in range(2000):
        live.append((record_bytes, [write]))
        n = merge_tail([size for size, _ in live])
        if n:
            assert n >= 2 and all(size < SEALED_BYTES for size, _ in live[-n:])
            held = [w for _, ws in live[-n:] for w in ws]
            live[-n:] = [(sum(size for size, _ in live[-n:]), held)]
            for w in held:
                merges_of[w] += 1
        assert merge_tail([size for size, _ in live]) == 0  # one call does the whole cascade
        assert sum(size < SEALED_BYTES for size, _ in live) <= 24
    assert max(merges_of) <= 3
    assert record_bytes >= SEALED_BYTES or len(live) <= 2000 / 8  # it did merge


def test_writes_of_the_category_files_merge_them_without_losing_a_row(tmp_path, monkeypatch):
    """Many writes of the category files, with removals in between, through the writer's own
    record of each folder's segments: every folder ends with exactly its committed rows, in
    commit order, no leftover, and nothing more to merge. (Small classes and fan-out make
    tiny segments merge often.)"""
    monkeypatch.setattr(category_files, "MERGE_FANOUT", 2)
    monkeypatch.setattr(category_files, "CLASS_BYTES", 256)
    db = tmp_path / "db"
    images = new_images(tmp_path / "src", 0, 300)
    with open_writer(db, SETTINGS) as writer:
        writer.record_every = 5
        for start in range(0, 300, 5):
            writer.add_images(images[start : start + 5])
            if start % 50 == 45:  # one image of the last ten goes again
                writer.remove_paths([str(images[start - 3].source_path)])
            if start == 120:  # and a whole write's segment, in each folder
                writer.remove_paths(str(img.source_path) for img in images[120:125])
    kept = [img for i, img in enumerate(images) if i % 50 != 42 and not 120 <= i < 125]
    with Database.open(db) as d:
        for wnid in WNIDS:
            folder = d.category_dir(wnid)
            live, stale = segments(folder)
            assert not stale and 1 < len(live) < 30, [seg.path.name for seg in live]
            assert merge_tail([seg.path.stat().st_size for seg in live]) == 0
            got = read_folder(folder, DIM)
            assert got.ids.tolist() == [img.image_id for img in kept]
            expected = np.stack([img.feature for img in kept]).astype(np.float16)
            np.testing.assert_array_equal(got.features, expected)


def test_check_finds_a_feature_row_that_differs_from_the_matrix_and_repair_restores_it(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(check_module, "COMPARE_ROWS", 7)  # the changed row is in a later block
    db = tmp_path / "db"
    with open_writer(db, SETTINGS) as writer:
        writer.add_images(new_images(tmp_path / "src", 0, 40))
    with Database.open(db) as d:
        folder = d.category_dir(WNIDS[1])
    [segment] = segments(folder)[0]
    stored = read_segment(segment.path, DIM)
    features = stored.features.copy()
    features[30] = -features[30]
    write_atomic(segment.path, CategoryRows(stored.ids, stored.files, stored.probs,
                                            features).writer())  # fmt: skip
    assert check_database(db) == [f"{folder}: features differ from the search matrix"]
    assert check_database(db, repair=True) == [
        f"{folder}: features differ from the search matrix; rewritten from the search matrix"]
    assert check_database(db) == []
    repaired = read_folder(folder, DIM)
    order, stored_order = np.argsort(repaired.ids), np.argsort(stored.ids)
    np.testing.assert_array_equal(repaired.features[order], stored.features[stored_order])


def database_with_removals(tmp_path: Path, n: int, removed: range) -> tuple[Path, list[NewImage]]:
    db = tmp_path / "db"
    images = new_images(tmp_path / "src", 0, n)
    with open_writer(db, SETTINGS) as writer:
        writer.add_images(images)
        writer.remove_paths(str(images[i].source_path) for i in removed)
    return db, images


def test_exhaustive_search_passes_over_rows_of_removed_images(tmp_path):
    db, images = database_with_removals(tmp_path, 300, range(0, 200))
    query = images[5].feature  # a removed image: its row is dead, never a result
    live = images[200:]
    stored = np.stack([i.feature for i in live]).astype(np.float16)
    with Database.open(db) as d:
        assert d.matrix().n_rows == 300 and d.n_images() == 100  # below the compaction size
        mean = d.centre().mean
        found = exhaustive(d, query, 10, 3, mean)
        ids = [d.catalog.ids_of_rows([r])[r] for r in found.positions.tolist()]
    expected, scores = definition(query, stored, 10, 3, mean)
    assert ids == [live[i].image_id for i in expected]
    np.testing.assert_allclose(found.scores, scores, atol=2e-3)


def test_the_matrix_is_compacted_once_dead_rows_outnumber_live_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "MIN_DEAD_ROWS", 10)
    db, images = database_with_removals(tmp_path, 60, range(0, 40))
    assert [p.name for p in db.glob("matrix-*.f16")] == ["matrix-2.f16"]
    with Database.open(db) as d:
        assert d.matrix().n_rows == 20
        for image in images[40:]:
            record = d.image(image.image_id)
            np.testing.assert_allclose(d.matrix().gather(np.array([record.row]))[0],
                                       image.feature, atol=1e-3)  # fmt: skip
    from cbir.db import check_database

    assert check_database(db) == []


def test_a_database_of_another_format_is_refused_with_the_fix(tmp_path):
    db = tmp_path / "db"
    with open_writer(db, SETTINGS) as writer:
        writer.add_images(new_images(tmp_path / "src", 0, 2))
    manifest = json.loads((db / MANIFEST_NAME).read_text())
    (db / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": 3}))
    with pytest.raises(DatabaseError, match="format 3.*rebuild it with 'cbir create-db"):
        Database.open(db)
    with pytest.raises(DatabaseError, match="format 3"), open_writer(db):
        pass


def clustered_images(folder: Path, n: int, centres: np.ndarray, seed: int) -> list[NewImage]:
    """n images whose features lie around `centres` (c, DIM), as real features cluster."""
    rng = np.random.default_rng(seed)
    images = new_images(folder, seed * 100_000, n)
    for i, image in enumerate(images):
        feature = centres[i % len(centres)] + 0.15 * rng.standard_normal(DIM)
        object.__setattr__(image, "feature", (feature / np.linalg.norm(feature)).astype(np.float32))
    return images


def test_an_inverted_file_is_trained_at_size_and_gates_queries(tmp_path, monkeypatch):
    from cbir.db import check_database, ivf
    from cbir.db.database import CategoryMembers
    from cbir.query import QueryOptions, search

    monkeypatch.setattr(ivf, "IVF_MIN_IMAGES", 300)
    monkeypatch.setattr(ivf, "APPROXIMATE_ALL_MIN_IMAGES", 300)
    centres = np.random.default_rng(0).standard_normal((8, DIM))
    db = tmp_path / "db"
    images_before = clustered_images(tmp_path / "src", 250, centres, seed=1) + \
        clustered_images(tmp_path / "src", 100, centres, seed=2)  # fmt: skip
    with open_writer(db, SETTINGS) as writer:
        writer.add_images(images_before[:250])
        assert writer.catalog.ivf_state() == (0, 0)  # too small yet
        writer.add_images(images_before[250:])
        assert writer.catalog.ivf_state() == (1, 350)  # trained on crossing 300
        later = clustered_images(tmp_path / "src", 20, centres, seed=3)
        writer.add_images(later)  # new rows until there are more than new_rows_limit
        assert writer.catalog.unlisted(len(writer.db.ivf())) == 0
        assert len(writer.db.ivf()) >= ivf.n_lists_for(350)  # and lists for rows that fit none
        assert writer.catalog.count_in_list(ivf.NEW_ROWS) == 20
    assert [p.name for p in db.glob("ivf-*.npz")] == ["ivf-1.npz"]
    assert check_database(db) == []
    probs = np.zeros(1000, np.float32)
    first = np.stack([i.feature for i in images_before]).astype(np.float16).astype(np.float64)
    with Database.open(db) as d:
        inverted = d.ivf()
        # its lists live in the space queries rank in: centred on the mean when trained
        assert np.allclose(inverted.mean, first.mean(axis=0), atol=1e-6)
        members = CategoryMembers(d)
        for image in later[:5]:  # gated queries walk the nearest lists to their budget
            gated = search(d, image.source_path, probs, image.feature, CategoryMembers(d),
                           QueryOptions(n_results=5, min_candidates=60))  # fmt: skip
            assert gated.method == "gated" and gated.gating.order == "lists"
            assert gated.gating.wnids == () and len(gated.gating.lists) > 2
            assert gated.gating.lists[0] == ivf.NEW_ROWS  # the 20 new rows, then lists
            assert 80 <= gated.n_searched < 370
            assert gated.hits[0].id == image.image_id
            in_lists = d.catalog.rows_of_lists(list(gated.gating.lists))
            assert len(in_lists) == gated.n_searched
            walked = list(gated.gating.lists[1:])
            assert set(d.catalog.rows_of_lists(walked[:-1])).isdisjoint(
                d.catalog.rows_of_lists([walked[-1]]))
            assert len(d.catalog.rows_of_lists(walked[:-1])) < 60
        for image in later[:5]:
            approximate = search(d, image.source_path, probs, image.feature, members,
                                 QueryOptions(n_results=5, search_all=True))  # fmt: skip
            exact = search(d, image.source_path, probs, image.feature, members,
                           QueryOptions(n_results=5, search_all=True, exact=True))  # fmt: skip
            assert approximate.method == "ivf" and exact.method == "exact"
            assert approximate.hits[0].id == exact.hits[0].id == image.image_id
            assert approximate.n_searched < exact.n_searched == 370
    (db / "ivf-1.npz").unlink()  # check names it; repair trains it again
    assert any("ivf-1.npz is missing" in p for p in check_database(db))
    assert check_database(db, repair=True) and check_database(db) == []


def test_images_added_after_the_lists_were_trained_are_found_and_then_covered(tmp_path,
                                                                             monkeypatch):
    """A new kind of image arriving after the lists were trained is searched by every gated
    query while it is new, and then gets lists of its own (issue 29: photos of a new kind
    spread over lists trained without them were mostly not found)."""
    from cbir.db import ivf
    from cbir.db.database import CategoryMembers
    from cbir.query import QueryOptions, search

    monkeypatch.setattr(ivf, "IVF_MIN_IMAGES", 300)
    monkeypatch.setattr(ivf, "NEW_ROWS_MIN", 40)
    rng = np.random.default_rng(0)
    old_kinds, new_kinds = rng.standard_normal((8, DIM)), rng.standard_normal((2, DIM))
    db = tmp_path / "db"
    with open_writer(db, SETTINGS) as writer:
        writer.add_images(clustered_images(tmp_path / "src", 320, old_kinds, seed=1))
        trained = len(writer.db.ivf())
        arrived = clustered_images(tmp_path / "src", 30, new_kinds, seed=2)
        writer.add_images(arrived)  # 30 new rows: at most 40 are kept before covering
        assert writer.catalog.count_in_list(ivf.NEW_ROWS) == 30
        assert writer.catalog.ivf_state() == (1, 320)
    probs = np.zeros(1000, np.float32)
    options = QueryOptions(n_results=10, min_candidates=40, query_expansion=0)

    def found(d: Database, image: NewImage) -> tuple[list[int], list[int], int]:
        gated = search(d, image.source_path, probs, image.feature, CategoryMembers(d), options)
        exact = search(d, image.source_path, probs, image.feature, CategoryMembers(d),
                       replace(options, search_all=True))  # fmt: skip
        return [h.id for h in gated.hits], [h.id for h in exact.hits], gated.n_searched

    with Database.open(db) as d:
        for image in arrived[:4]:  # new, so searched by every gated query
            gated, exact, searched = found(d, image)
            assert gated == exact and searched < 200
    with open_writer(db, SETTINGS) as writer:  # 15 more pass the limit: covered
        more = clustered_images(tmp_path / "src", 15, new_kinds, seed=3)
        writer.add_images(more)
        assert writer.catalog.count_in_list(ivf.NEW_ROWS) == 0
        assert writer.catalog.ivf_state() == (2, 320)  # a new generation, not a retraining
        grown = writer.db.ivf()
        assert len(grown) > trained  # lists of the new kind were added ...
        assert writer.catalog.unlisted(len(grown)) == 0
    assert [p.name for p in db.glob("ivf-*.npz")] == ["ivf-2.npz"]
    with Database.open(db) as d:
        lists = d.catalog.lists_in_row_order()
        assert set(lists[320:].tolist()) >= set(range(trained, len(grown)))  # ... for them
        assert set(lists[:320].tolist()) <= set(range(trained))  # the others kept theirs
        for image in more[:4]:  # and gated queries walk them
            gated, exact, searched = found(d, image)
            assert gated[:5] == exact[:5] and searched < 200
    assert check_database(db) == []


def test_check_trains_the_inverted_file_a_database_grown_without_one_lacks(tmp_path, monkeypatch):
    from cbir.db import check_database, ivf

    centres = np.random.default_rng(0).standard_normal((8, DIM))
    db = tmp_path / "db"
    with open_writer(db, SETTINGS) as writer:  # as an older cbir grew it: no lists
        writer.add_images(clustered_images(tmp_path / "src", 320, centres, seed=1))
    monkeypatch.setattr(ivf, "IVF_MIN_IMAGES", 300)
    assert check_database(db) == ["the database holds 320 images and no inverted file, so "
                                  "gated queries search whole categories"]  # fmt: skip
    check_database(db, repair=True)
    assert check_database(db) == []
    with Database.open(db) as d:
        assert d.catalog.ivf_state() == (1, 320) and d.catalog.unlisted(len(d.ivf())) == 0


def test_query_threads_never_share_a_candidate_buffer():
    """The process reuses one candidate buffer (a fresh one's page faults cost more than a
    gathered query): a thread gets it only while no other holds it, and candidates too large
    for it get their own."""
    from concurrent.futures import ThreadPoolExecutor

    from cbir.query import SCRATCH_BYTES, _candidate_rows

    with _candidate_rows(8, 10) as first:
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(lambda: _enter_and_report(8, 10)).result()
        assert other is not first
    with _candidate_rows(8, 10) as again:
        assert again is first  # reused once released
    with _candidate_rows(8, SCRATCH_BYTES) as large:
        assert large is not first


def _enter_and_report(dim: int, n: int) -> object:
    from cbir.query import _candidate_rows

    with _candidate_rows(dim, n) as rows:
        return rows
