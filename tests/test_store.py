"""A category's rows live in segments; merging them streams the features through in blocks."""

from __future__ import annotations

import numpy as np
import pytest

from cbir import store
from cbir.errors import DatabaseError
from cbir.store import CategoryRows, read_category_file

DIM = 8


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
