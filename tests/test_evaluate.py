"""Retrieval metrics against hand-computed cases; `cbir evaluate` against a brute-force ranking
and against the other front ends."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from cbir.evaluate import (
    average_precision,
    labels_from_csv,
    mean_average_precision,
    precision_at,
    recall_at,
)
from cbir.features import apply_whitening, expand_query, learn_whitening
from tests.conftest import EVALDATA, TESTDATA, needs_shared

# -- metrics by hand -----------------------------------------------------------------------


def test_average_precision_of_a_known_ranking():
    ranking = [True, False, True, False, False]  # relevant at ranks 1 and 3, 3 in the database
    assert average_precision(ranking, 3) == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert average_precision([False, True], 1) == pytest.approx(1 / 2)
    assert average_precision([False, False], 2) == 0.0  # nothing relevant returned
    assert average_precision([True, True], 2) == 1.0


def test_average_precision_refuses_impossible_input():
    with pytest.raises(ValueError):
        average_precision([True], 0)
    with pytest.raises(ValueError):
        average_precision([True, True], 1)


def test_precision_recall_and_map_of_known_rankings():
    ranking = [True, False, True, False, False]
    assert precision_at(ranking, 1) == 1.0
    assert precision_at(ranking, 5) == pytest.approx(2 / 5)
    assert precision_at(ranking, 10) == pytest.approx(2 / 10)  # a short ranking is penalised
    assert recall_at(ranking, 5, 3) == pytest.approx(2 / 3)
    assert recall_at(ranking, 1, 3) == pytest.approx(1 / 3)
    expected = ((1 + 2 / 3) / 3 + 1 / 2) / 2
    assert mean_average_precision([ranking, [False, True]], [3, 1]) == pytest.approx(expected)


# -- the evaluation of a hand-made database ------------------------------------------------


def test_pca_whitening_decorrelates_and_pca_alone_keeps_centred_cosines():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    white = learn_whitening(x, power=0.5, shrinkage=0.0)
    projected = (x - white.mean) @ white.projection.T
    assert np.allclose(np.cov(projected, rowvar=False), np.eye(6), atol=1e-3)
    pca = learn_whitening(x, power=0.0)
    centred = x - x.mean(axis=0)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    y = apply_whitening(pca, x)
    assert np.allclose(y @ y.T, centred @ centred.T, atol=1e-4)
    assert apply_whitening(learn_whitening(x, dim=2), x).shape == (200, 2)


def test_query_expansion_averages_the_query_with_its_top_rows():
    q = np.array([1.0, 0.0], np.float32)
    top = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
    assert np.allclose(expand_query(q, top), np.array([1.0, 2.0]) / np.sqrt(5))
    weighted = expand_query(q, top, np.array([1.0, 0.5], np.float32), alpha=1.0)
    assert np.allclose(weighted, np.array([1.0, 1.5]) / np.sqrt(3.25))


# -- cbir evaluate end to end --------------------------------------------------------------


def _ap_by_brute_force(order: list[int], labels: list[str], query: int) -> float:
    """Independent of cbir.evaluate: precision at each relevant rank, over the relevant count."""
    relevant = [labels[j] == labels[query] for j in order]
    found, total = 0, 0.0
    for rank, is_relevant in enumerate(relevant, start=1):
        if is_relevant:
            found += 1
            total += found / rank
    return total / sum(relevant)


@needs_shared
def test_cli_evaluate_matches_brute_force_rankings(tmp_path, capsys, lite0):
    from cbir.cli import main
    from cbir.images import load_image

    source = tmp_path / "labelled"
    paths, labels = [], []
    for label in ("fruit", "vehicle", "musical_instrument"):
        (source / label).mkdir(parents=True)
        for image in sorted((EVALDATA / label).glob("*.jpg"))[:4]:
            shutil.copy(image, source / label / image.name)
            paths.append(source / label / image.name)
            labels.append(label)
    (source / "labels.csv").write_text("not an image\n")

    features = lite0.describe(np.stack([load_image(p, 224) for p in paths])).features["gap"]
    features = features.astype(np.float16).astype(np.float32)  # as the database stores them
    argv = ["evaluate", str(source), "--model", "efficientnet_lite0", "--json",
            "--query-expansion", "0"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["n_images"], result["n_queries"], result["n_labels"]) == (12, 12, 3)
    assert result["not_indexed"] == 0 and result["backbone"] == "efficientnet_lite0"
    for mode in ("gated", "exhaustive"):
        scores = result[mode]
        for key in ("map", "p_at_1", "p_at_5", "p_at_10", "r_at_10", "rows_share"):
            assert 0.0 <= scores[key] <= 1.0
        assert scores["p_at_10"] <= 3 / 10 + 1e-9  # only 3 other images share a label
    assert result["exhaustive"]["rows_searched"] == 12  # its own row, then left out
    assert result["gated"] == result["exhaustive"]  # 12 images < 1000 candidates: all
    assert result["top10_kept"] == 1.0
    mean = features.mean(axis=0)  # the database's mean, the query's own row in it
    centred = features - mean
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    aps = []
    for q in range(len(paths)):
        others = [j for j in range(len(paths)) if j != q]
        similarity = centred[others] @ centred[q]
        order = [others[j] for j in np.argsort(-similarity, kind="stable")]
        aps.append(_ap_by_brute_force(order, labels, q))
    assert result["exhaustive"]["map"] == pytest.approx(float(np.mean(aps)), abs=2e-3)


@needs_shared
def test_cli_evaluate_reads_groups_with_distractors(tmp_path, capsys, lite0):
    from cbir.cli import main

    groups = tmp_path / "groups.csv"
    with open(groups, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "group"])
        for stem, folder in (("chelsea", "animals"), ("rocket", "vehicles")):
            out.writerow([TESTDATA / "photos" / folder / f"{stem}.jpg", stem])
            for variant in ("grey", "hflip"):
                out.writerow([TESTDATA / "near_duplicates" / f"{stem}__{variant}.jpg", stem])
        out.writerow([TESTDATA / "photos" / "animals" / "koala.jpg", ""])
    assert labels_from_csv(groups)[str(TESTDATA / "photos" / "animals" / "koala.jpg")] is None

    argv = ["evaluate", "--groups", str(groups), "--model", "efficientnet_lite0", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["n_images"], result["n_queries"], result["n_labels"]) == (7, 6, 2)
    assert result["exhaustive"]["map"] > 0.9  # a greyscale or mirrored copy is found first


@needs_shared
def test_cli_evaluate_scores_a_labelled_set_among_distractors(tmp_path, capsys, lite0):
    from cbir.cli import main

    labelled = tmp_path / "labelled"
    for stem, folder in (("chelsea", "animals"), ("rocket", "vehicles")):
        (labelled / stem).mkdir(parents=True)
        shutil.copy(TESTDATA / "photos" / folder / f"{stem}.jpg", labelled / stem)
        for variant in ("grey", "hflip"):
            shutil.copy(TESTDATA / "near_duplicates" / f"{stem}__{variant}.jpg", labelled / stem)
    distractors = TESTDATA / "photos" / "landscapes"
    n_distractors = len(list(distractors.glob("*.jpg")))
    argv = ["evaluate", str(labelled), "--distractors", str(distractors),
            "--model", "efficientnet_lite0", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["n_images"], result["n_queries"]) == (6 + n_distractors, 6)
    assert result["exhaustive"]["map"] > 0.9  # the copies are still found first
    assert result["exhaustive"]["rows_searched"] == 6 + n_distractors
    assert main(argv + ["--db", str(tmp_path)]) == 1
    assert "not with --db" in capsys.readouterr().err


def test_cli_evaluate_needs_exactly_one_source(capsys):
    from cbir.cli import main

    assert main(["evaluate"]) == 1
    assert "either a labelled folder or --groups" in capsys.readouterr().err


@needs_shared
def test_cli_evaluate_db_gates_by_the_inverted_lists_as_query_does(tmp_path, capsys, monkeypatch,
                                                                   lite0):
    from cbir.cli import main
    from cbir.db import ivf

    monkeypatch.setattr(ivf, "IVF_MIN_IMAGES", 16)  # 19 images: 4 lists of about 5
    labelled = tmp_path / "labelled"
    for label in ("fruit", "vehicle", "musical_instrument"):
        (labelled / label).mkdir(parents=True)
        for image in sorted((EVALDATA / label).glob("*.jpg"))[:4]:
            shutil.copy(image, labelled / label / image.name)
    landscapes = sorted((TESTDATA / "photos" / "landscapes").glob("*.jpg"))[:8]
    (tmp_path / "more").mkdir()
    for image in landscapes:
        shutil.copy(image, tmp_path / "more" / image.name)
    db = tmp_path / "db"
    assert main(["create-db", str(labelled), str(db), "--model", "efficientnet_lite0"]) == 0
    assert main(["add", str(db), str(tmp_path / "more")]) == 0  # crosses 16: lists trained
    capsys.readouterr()
    n = 12 + len(landscapes)
    argv = ["evaluate", str(labelled), "--db", str(db), "--json", "--min-candidates", "5"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["gated_by"] == "lists" and result["n_images"] == n
    assert 5 <= result["gated"]["rows_searched"] < result["exhaustive"]["rows_searched"] == n
    query = sorted((labelled / "fruit").glob("*.jpg"))[0]
    assert main(["query", str(db), str(query), "--json", "--min-candidates", "5"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["searched_categories"] == [] and found["searched_lists"]
    assert 5 <= found["searched"] < n
    assert found["results"][0]["paths"] == [str(query)]  # its own list comes first
    assert main(["query", str(db), str(query), "--json", "--all"]) == 0
    assert json.loads(capsys.readouterr().out)["search"] == "exact"  # approximate from 200k
    assert main(["info", str(db), "--json"]) == 0
    inverted = json.loads(capsys.readouterr().out)["inverted_file"]
    assert inverted["lists"] >= ivf.n_lists_for(n)  # and lists for rows that fit none
    assert (inverted["trained_on"], inverted["new_rows"]) == (n, 0)


@pytest.mark.parametrize("content, message", [
    (b"path,group\n" + b"x" * 140_000 + b",a\n", "is not a CSV of path,group rows"),
    (b"path,group\n\xff.jpg,a\n", "is not UTF-8 text"),
])
def test_a_groups_file_that_is_not_a_csv_is_one_line(tmp_path, capsys, content, message):
    from cbir.cli import main

    groups = tmp_path / "groups.csv"
    groups.write_bytes(content)
    assert main(["evaluate", "--groups", str(groups), "--model", "efficientnet_lite0"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
