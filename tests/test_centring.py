"""Centring: the catalog's feature sums stay equal to sums made afresh through adds, removes
and compaction; check finds and repairs tampered sums; a query compares rows centred on the
database's mean and gates by category centroids."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from cbir.centring import sums_by_category
from cbir.db import CATALOG_NAME, Database, Settings, check_database, open_writer
from cbir.db import writer as writer_module
from cbir.db.database import CategoryMembers
from cbir.query import QueryOptions, search
from tests.reference import definition
from tests.test_store import DIM, new_images

SETTINGS = Settings("synthetic", "none", DIM, top_k=2)
CATEGORIES = ("n01440764", "n01443537", "n01484850", "n01491361")  # tench .. tiger shark


def spread_over_categories(images: list, centres: np.ndarray, seed: int) -> list:
    """Give image i the categories (i, i+1) mod 4 and a feature near centre i mod 4."""
    rng = np.random.default_rng(seed)
    for i, image in enumerate(images):
        c = i % len(CATEGORIES)
        feature = centres[c] + 0.3 * rng.standard_normal(DIM)
        object.__setattr__(image, "wnids", (CATEGORIES[c], CATEGORIES[(c + 1) % 4]))
        object.__setattr__(image, "feature", (feature / np.linalg.norm(feature)).astype(np.float32))
    return images


def sums_afresh(db: Database) -> dict[str, np.ndarray]:
    ids, rows = db.catalog.all_rows()
    features = db.matrix().gather(rows).astype(np.float64)
    return sums_by_category(features, [db.image(int(i)).wnids for i in ids])


def assert_sums_exact(db_dir: Path) -> None:
    with Database.open(db_dir) as db:
        stored = db.catalog.feature_sums(DIM)
        fresh = sums_afresh(db)
        live = {w for w, v in stored.items() if w == "" or v.any()}
        assert live == set(fresh) | ({""} if "" in stored else set())
        for wnid, value in fresh.items():
            np.testing.assert_array_equal(stored[wnid], value)  # exact, not close


def test_feature_sums_equal_a_recomputation_through_adds_removes_and_compaction(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(writer_module, "MIN_DEAD_ROWS", 20)
    centres = np.random.default_rng(0).standard_normal((4, DIM))
    images = spread_over_categories(new_images(tmp_path / "src", 0, 120), centres, seed=1)
    db = tmp_path / "db"
    with open_writer(db, SETTINGS) as writer:
        writer.add_images(images[:50])
        writer.add_images(images[50:90])
    assert_sums_exact(db)
    with open_writer(db) as writer:
        writer.remove_paths(str(i.source_path) for i in images[10:40:3])
    assert_sums_exact(db)
    with open_writer(db) as writer:
        writer.add_images(images[90:] + images[10:40:3])  # back again, at new rows
        writer.remove_paths(str(i.source_path) for i in images[:80])  # compacts the matrix
    assert [p.name for p in db.glob("matrix-*.f16")] == ["matrix-2.f16"]
    assert_sums_exact(db)
    with open_writer(db) as writer:
        writer.remove_paths(str(i.source_path) for i in images)
    with Database.open(db) as d:
        assert d.n_images() == 0 and d.centre() is None
        np.testing.assert_array_equal(d.catalog.feature_sums(DIM)[""], np.zeros(DIM))
    assert check_database(db) == []


def database_of(tmp_path: Path, n: int, seed: int) -> tuple[Path, list]:
    """A database of n synthetic images spread over the four categories."""
    images = spread_over_categories(new_images(tmp_path / "src", 0, n), np.eye(4, DIM), seed)
    db = tmp_path / "db"
    with open_writer(db, SETTINGS) as writer:
        writer.add_images(images)
    return db, images


def test_check_finds_tampered_feature_sums_and_repair_sums_them_afresh(tmp_path):
    db, _ = database_of(tmp_path, 40, seed=2)
    with sqlite3.connect(db / CATALOG_NAME) as conn:
        conn.execute("UPDATE feature_sums SET sum = ? WHERE wnid = ?",
                     (np.ones(DIM).tobytes(), CATEGORIES[1]))  # fmt: skip
    assert any("feature sums that disagree" in p for p in check_database(db))
    assert any("summed afresh" in p for p in check_database(db, repair=True))
    assert check_database(db) == []
    assert_sums_exact(db)
    with sqlite3.connect(db / CATALOG_NAME) as conn:
        conn.execute("UPDATE feature_sums SET sum = x'00' WHERE wnid = ''")
    assert any("invalid feature sums" in p for p in check_database(db))
    check_database(db, repair=True)
    assert_sums_exact(db)


def test_a_gated_query_ranks_centred_rows_of_the_categories_nearest_by_centroid(tmp_path):
    rng = np.random.default_rng(3)
    common = 2.0 * rng.standard_normal(DIM)  # every feature shares this direction
    centres = common + rng.standard_normal((4, DIM))
    images = spread_over_categories(new_images(tmp_path / "src", 0, 400), centres, seed=4)
    db = tmp_path / "db"
    with open_writer(db, SETTINGS) as writer:
        writer.add_images(images)
    query = centres[2] + 0.3 * rng.standard_normal(DIM)
    query = (query / np.linalg.norm(query)).astype(np.float32)
    with Database.open(db) as d:
        centre = d.centre()
        ids, rows = d.catalog.all_rows()
        features = d.matrix().gather(rows)
        np.testing.assert_allclose(centre.mean, features.mean(axis=0), atol=1e-6)
        members = CategoryMembers(d)
        result = search(d, Path("q.jpg"), np.zeros(1000, np.float32), query, members,
                        QueryOptions(n_results=10, min_candidates=150))  # fmt: skip
        # Images near centre 2 are in categories 2 and 3, the ones near 1 in 1 and 2: the
        # nearest centroid is category 2's, and it alone holds 200 >= 150 images.
        assert result.gating.wnids == (CATEGORIES[2],) and result.gating.order == "centroids"
        gated = np.isin(rows, members[CATEGORIES[2]])
        expected, scores = definition(query, features[gated], 10, 3, centre.mean)
    assert [h.id for h in result.hits] == ids[gated][expected].tolist()
    np.testing.assert_allclose([h.score for h in result.hits], scores, atol=2e-3)
    np.testing.assert_allclose([h.cosine for h in result.hits],
                               features[gated][expected] @ query, atol=1e-5)  # fmt: skip
    plain, _ = definition(query, features[gated], 10, 3)
    assert plain.tolist() != expected.tolist()  # centring changed the ranking


def test_sums_a_repair_could_not_keep_are_dropped_then_restored_by_the_next_writer(tmp_path):
    db, images = database_of(tmp_path, 30, seed=5)
    with Database.open(db) as d:
        assert d.centre() is not None
        # check --repair drops an image while the matrix is not trusted, then is killed
        d.catalog.drop_images([images[0].image_id], None)
        assert d.centre() is None  # not centred on a wrong mean: not centred at all
    assert any("no feature sums" in p for p in check_database(db))
    with open_writer(db):
        pass  # a writer sums them afresh on opening
    assert_sums_exact(db)
    with Database.open(db) as d:
        assert d.centre() is not None and d.centre().n_images == 29
    # the rest of that repair (category files, the manifest) is still to do; the sums are fine
    assert not any("feature sums" in p for p in check_database(db))
    check_database(db, repair=True)
    assert check_database(db) == []
    assert_sums_exact(db)
