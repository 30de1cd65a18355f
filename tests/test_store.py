"""Rewriting a category file with rows added streams its old features through in blocks."""

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


@pytest.mark.parametrize(
    "n_old", [0, 1, store.FEATURE_BLOCK_ROWS, 2 * store.FEATURE_BLOCK_ROWS + 7]
)
def test_appending_keeps_committed_rows_in_order_then_the_new_ones(tmp_path, n_old):
    path = tmp_path / "features.npz"
    old = rows(list(range(n_old)), seed=1)
    if n_old:
        store._write_atomic(path, store._category_writer(old))
    committed = np.array([i for i in range(n_old) if i % 5 != 2], np.int64)  # some uncommitted
    added = rows([10_000 + i for i in range(3)], seed=2)

    store._write_atomic(path, store._appending_writer(path, DIM, committed, added))

    got = read_category_file(path, DIM)
    keep = np.isin(old.ids, committed)
    np.testing.assert_array_equal(got.ids, np.concatenate([old.ids[keep], added.ids]))
    np.testing.assert_array_equal(got.paths, np.concatenate([old.paths[keep], added.paths]))
    np.testing.assert_array_equal(got.files, np.concatenate([old.files[keep], added.files]))
    np.testing.assert_array_equal(
        got.features, np.concatenate([old.features[keep], added.features])
    )


@pytest.mark.parametrize("damage", ["truncated", "corrupted in the middle"])
def test_appending_to_a_damaged_file_names_it_and_the_fix(tmp_path, damage):
    path = tmp_path / "features.npz"
    store._write_atomic(path, store._category_writer(rows(list(range(600)), seed=1)))
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[-3000:]
    else:
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    write = store._appending_writer(path, DIM, np.arange(600), rows([7_000], seed=2))
    with pytest.raises(DatabaseError, match="damaged.*cbir check --repair"):
        store._write_atomic(path, write)
    assert len(path.read_bytes()) == len(data)  # left as it was


def test_appending_features_of_another_size_is_refused(tmp_path):
    path = tmp_path / "features.npz"
    store._write_atomic(path, store._category_writer(rows([1, 2], seed=1)))
    write = store._appending_writer(path, DIM + 1, np.arange(3), rows([3], seed=2))
    with pytest.raises(DatabaseError, match=r"shape \(2, 8\).*expected \(2, 9\)"):
        store._write_atomic(path, write)
