"""Ranking and category gating, on small hand-made arrays."""

from __future__ import annotations

import itertools

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


def test_centred_ranking_equals_cosines_of_centred_rows():
    rng = np.random.default_rng(7)
    features = unit(rng.standard_normal((300, 16)).tolist()) + 0.8  # a shared direction
    features = unit(features.tolist())
    mean = features.mean(axis=0)
    query = unit([(features[5] + 0.3 * rng.standard_normal(16)).tolist()])[0]
    centred = unit((features - mean).tolist())
    for expansion in (0, 3):
        got, scores = top_matches(query, features, 20, expansion, mean=mean)
        expected, _ = top_matches(unit([(query - mean).tolist()])[0], centred, 20, expansion)
        assert got.tolist() == expected.tolist()
        np.testing.assert_allclose(scores, features[got] @ query, atol=1e-6)  # plain cosines
    plain, _ = top_matches(query, features, 20)
    assert plain.tolist() != got.tolist()  # centring changes the order here


def test_a_query_head_maps_the_centred_query_and_only_the_query():
    rng = np.random.default_rng(8)
    features = unit((rng.standard_normal((200, 16)) + 0.5).tolist())
    mean = features.mean(axis=0)
    head = (np.eye(16) + 0.5 * rng.standard_normal((16, 16))).astype(np.float32)
    query = unit([(features[3] + 0.2 * rng.standard_normal(16)).tolist()])[0]
    got, scores = top_matches(query, features, 20, 0, mean=mean, head=head)
    probe = unit([head @ unit([(query - mean).tolist()])[0]])[0]  # the definition
    expected = np.argsort(-(unit((features - mean).tolist()) @ probe), kind="stable")[:20]
    assert got.tolist() == expected.tolist()
    np.testing.assert_allclose(scores, features[got] @ query, atol=1e-6)  # plain cosines
    assert got.tolist() != top_matches(query, features, 20, 0, mean=mean)[0].tolist()
    identity = top_matches(query, features, 20, 3, mean=mean, head=np.eye(16, dtype=np.float32))
    assert identity[0].tolist() == top_matches(query, features, 20, 3, mean=mean)[0].tolist()


def test_ranking_float16_rows_with_faiss_agrees_with_top_matches():
    from cbir.ranking import Float16Rows, rank

    rng = np.random.default_rng(3)
    rows = unit(rng.standard_normal((500, 32)).tolist()).astype(np.float16)
    query = unit([rng.standard_normal(32).tolist()])[0]
    index = Float16Rows(32)
    index.buffer(len(rows))[:] = rows.view(np.uint8)
    mean = rows.astype(np.float32).mean(axis=0) + 0.05
    only = np.arange(0, 500, 3)
    head = (np.eye(32) + 0.3 * rng.standard_normal((32, 32))).astype(np.float32)
    for expansion, centre, h in itertools.product((0, 3), (None, mean), (None, head)):
        got, scores = rank(index, query, 10, expansion, mean=centre, head=h)
        expected, expected_scores = top_matches(query, rows.astype(np.float32), 10, expansion,
                                                mean=centre, head=h)  # fmt: skip
        assert got.tolist() == expected.tolist()
        np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
        got, _ = rank(index, query, 10, expansion, only, centre, h)
        expected, _ = top_matches(query, rows[only].astype(np.float32), 10, expansion,
                                  mean=centre, head=h)  # fmt: skip
        assert got.tolist() == only[expected].tolist()
