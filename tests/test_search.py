"""Ranking and category gating, on small hand-made arrays."""

from __future__ import annotations

import itertools

import numpy as np

from cbir.search import choose_categories
from tests.reference import definition


def unit(rows: list[list[float]]) -> np.ndarray:
    x = np.array(rows, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ranked(features: np.ndarray, query: np.ndarray, n: int, expansion: int = 0, **kwargs):
    from cbir.ranking import Float16Rows, rank

    return rank(Float16Rows.of(features), query, n, expansion, **kwargs)


def test_ranking_is_by_cosine_best_first():
    features = unit([[1, 0], [0, 1], [1, 1], [1, 0.1]])
    found = ranked(features, unit([[1, 0]])[0], 3)
    assert found.positions.tolist() == [0, 3, 2]
    np.testing.assert_allclose(found.scores, [1, 0.995037, 0.707107], atol=1e-3)
    np.testing.assert_allclose(found.cosines, found.scores, atol=1e-6)  # nothing to centre


def test_query_expansion_ranks_by_the_better_of_the_query_and_its_average_with_its_first_rows():
    # query ~ row 0; row 1 is a little nearer to it than row 2, but row 2 is close to row 0
    # (the first result), so the expanded query prefers it.
    features = unit([[1, 0, 0.2], [0.6, 0.8, 0], [0.6, 0, 0.8]])
    query = unit([[0.9, 0.12, 0.1]])[0]
    assert ranked(features, query, 3).positions.tolist() == [0, 1, 2]
    expanded = ranked(features, query, 3, expansion=1)
    assert expanded.positions.tolist() == [0, 2, 1]
    expected, scores = definition(query, features.astype(np.float16), 3, 1)
    assert expanded.positions.tolist() == expected.tolist()
    np.testing.assert_allclose(expanded.scores, scores, atol=1e-3)  # what it was ranked by
    assert np.all(np.diff(expanded.scores) <= 0) and expanded.scores.max() <= 1
    np.testing.assert_allclose(expanded.cosines, features[[0, 2, 1]] @ query, atol=1e-3)


def test_widening_counts_an_image_stored_in_several_categories_once():
    members = {"a": np.array([1, 2]), "b": np.array([1, 2]), "c": np.array([3]),
               "d": np.array([4])}  # fmt: skip
    assert choose_categories(["a", "b", "c", "d"], members, min_candidates=3) == ("a", "b", "c")


def test_categories_the_database_lacks_are_passed_over():
    assert choose_categories(["x", "y", "z"], {"z": np.array([5])}, min_candidates=0) == ("z",)


def test_a_category_as_large_as_the_budget_needs_no_member_counting():
    class Unread(dict):
        def __getitem__(self, wnid):
            raise AssertionError(f"members of {wnid} were read")

    members = Unread(a=None, b=None)
    chosen = choose_categories(["a", "b"], members, min_candidates=1000,
                               sizes={"a": 1000, "b": 5})  # fmt: skip
    assert chosen == ("a",)


def test_ranking_float16_rows_follows_the_definition_centred_mapped_expanded_and_selected():
    rng = np.random.default_rng(3)
    rows = unit((rng.standard_normal((500, 32)) + 0.6).tolist()).astype(np.float16)
    query = unit([(rows[5] + 0.3 * rng.standard_normal(32)).tolist()])[0]
    mean = rows.astype(np.float32).mean(axis=0)
    only = np.arange(0, 500, 3)
    head = (np.eye(32) + 0.3 * rng.standard_normal((32, 32))).astype(np.float32)
    orders = set()
    for expansion, centre, h in itertools.product((0, 3), (None, mean), (None, head)):
        if h is not None and centre is None:
            continue  # a head maps centred queries
        got = ranked(rows, query, 10, expansion, mean=centre, head=h)
        expected, scores = definition(query, rows, 10, expansion, centre, h)
        assert got.positions.tolist() == expected.tolist()
        np.testing.assert_allclose(got.scores, scores, atol=2e-3)
        np.testing.assert_allclose(got.cosines, rows[expected].astype(np.float32) @ query,
                                   atol=1e-5)  # fmt: skip
        orders.add(tuple(expected.tolist()))
        got = ranked(rows, query, 10, expansion, only=only, mean=centre, head=h)
        expected, _ = definition(query, rows[only], 10, expansion, centre, h)
        assert got.positions.tolist() == only[expected].tolist()
    assert len(orders) > 3  # centring, the head and expansion each change the order here
