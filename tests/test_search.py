"""Ranking and category gating, on small hand-made arrays."""

from __future__ import annotations

import numpy as np

from cbir.search import choose_categories, top_matches


def unit(rows: list[list[float]]) -> np.ndarray:
    x = np.array(rows, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_top_matches_ranks_by_cosine_best_first():
    features = unit([[1, 0], [0, 1], [1, 1], [1, 0.1]])
    best, scores = top_matches(unit([[1, 0]])[0], features, 3)
    assert best.tolist() == [0, 3, 2]
    np.testing.assert_allclose(scores, [1, 0.995037, 0.707107], atol=1e-5)


def test_query_expansion_keeps_the_top_results_and_reranks_the_rest():
    # query ~ row 0; rows 1 and 2 tie for second by cosine to the query, but row 2 is
    # close to row 0 (the first result), so the expanded query prefers it.
    features = unit([[1, 0, 0], [0.6, 0.8, 0], [0.6, 0, 0.8]])
    query = unit([[0.9, 0.1, 0.1]])[0]
    plain, _ = top_matches(query, features, 3)
    assert plain.tolist() == [0, 1, 2]
    expanded, scores = top_matches(query, unit([[1, 0, 0.2], [0.6, 0.8, 0], [0.6, 0, 0.8]]), 3,
                                   expansion=1)  # fmt: skip
    assert expanded[0] == 0 and expanded.tolist() == [0, 2, 1]
    assert scores[1] < 1  # scores stay cosines to the query itself


def test_widening_counts_an_image_stored_in_several_categories_once():
    wnids = ["a", "b", "c", "d"]
    probs = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    members = {"a": np.array([1, 2]), "b": np.array([1, 2]), "c": np.array([3]),
               "d": np.array([4])}  # fmt: skip
    gating = choose_categories(probs, wnids, members, top_k=1, min_candidates=3)
    assert gating.wnids == ("a", "b", "c") and gating.widened and not gating.fell_back


def test_falls_back_to_the_most_probable_categories_the_database_has():
    probs = np.array([0.7, 0.2, 0.1], np.float32)
    gating = choose_categories(probs, ["x", "y", "z"], {"z": np.array([5])}, top_k=2,
                               min_candidates=0)  # fmt: skip
    assert gating.wnids == ("z",) and gating.fell_back


def test_a_category_as_large_as_the_budget_needs_no_member_counting():
    class Unread(dict):
        def __getitem__(self, wnid):
            raise AssertionError(f"members of {wnid} were read")

    probs = np.array([0.6, 0.4], np.float32)
    members = Unread(a=None, b=None)
    gating = choose_categories(probs, ["a", "b"], members, top_k=1, min_candidates=1000,
                               sizes={"a": 1000, "b": 5})  # fmt: skip
    assert gating.wnids == ("a",) and not gating.widened


def test_ranking_float16_rows_with_faiss_agrees_with_top_matches():
    from cbir.ranking import Float16Rows, rank

    rng = np.random.default_rng(3)
    rows = unit(rng.standard_normal((500, 32)).tolist()).astype(np.float16)
    query = unit([rng.standard_normal(32).tolist()])[0]
    index = Float16Rows(32)
    index.buffer(len(rows))[:] = rows.view(np.uint8)
    for expansion in (0, 3):
        got, scores = rank(index, query, 10, expansion)
        expected, expected_scores = top_matches(query, rows.astype(np.float32), 10, expansion)
        assert got.tolist() == expected.tolist()
        np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
