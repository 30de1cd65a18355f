"""cbir train: a query head learned from labels is stored in the database, used by every query
path and by evaluate --db, checked by check, and --reset gives back exactly the results from
before. Real Keras training throughout; the last tests use real photos and the real model."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import cbir
from cbir import training
from cbir.centring import directed
from cbir.cli import main
from cbir.db import CATALOG_NAME, Database, check_database, open_writer
from cbir.db.database import CategoryMembers
from cbir.errors import DatabaseError
from cbir.model import HEAD_TEMPERATURE, train_query_head
from cbir.query import QueryOptions, search
from cbir.search import choose_categories
from tests.conftest import TESTDATA, needs_shared
from tests.reference import definition
from tests.test_centring import SETTINGS, spread_over_categories
from tests.test_store import DIM, new_images


def clustered_database(tmp_path: Path) -> tuple[Path, list, np.ndarray]:
    """400 synthetic images near four centres that share one direction (categories follow
    the centres), and the centres."""
    rng = np.random.default_rng(11)
    centres = 2.0 * rng.standard_normal(DIM) + rng.standard_normal((4, DIM))
    images = spread_over_categories(new_images(tmp_path / "src", 0, 400), centres, seed=12)
    db = tmp_path / "db"
    with open_writer(db, SETTINGS) as writer:
        writer.add_images(images)
    return db, images, centres


def gated_query(db: Path, query: np.ndarray) -> list[tuple[int, float]]:
    with Database.open(db) as d:
        result = search(d, Path("q.jpg"), np.zeros(1000, np.float32), query, CategoryMembers(d),
                        QueryOptions(n_results=15, min_candidates=150))  # fmt: skip
    return [(h.id, h.score) for h in result.hits]


def test_train_stores_a_head_that_queries_use_and_reset_restores_the_exact_results(tmp_path):
    db, images, centres = clustered_database(tmp_path)
    rng = np.random.default_rng(13)
    queries = [centres[c] + 0.6 * rng.standard_normal(DIM) for c in range(4)]
    queries = [(q / np.linalg.norm(q)).astype(np.float32) for q in queries]
    before = [gated_query(db, q) for q in queries]
    # Labels that cut across the clusters, as a path,group file: the head has something to learn
    groups = tmp_path / "groups.csv"
    groups.write_text("path,group\n" + "".join(
        f"{img.source_path},group{int(img.feature[0] > 0)}\n" for img in images[:300]))

    with cbir.open_db(db) as opened:
        report = opened.train(groups=groups, epochs=8)

    assert report.n_images == 300 and report.n_classes == 2
    assert report.from_database == 300 and report.described == 0  # stored features, no model
    assert report.loss[-1] < report.loss[0]
    assert report.check is None  # two classes: too few to leave some out
    with Database.open(db) as d:
        head = d.query_head()
        assert head is not None and head.shape == (DIM, DIM)
        provenance = d.head_provenance()
        assert provenance["images"] == 300 and provenance["source"] == str(groups)
        centre = d.centre()
        ids, rows = d.catalog.all_rows()
        features = d.matrix().gather(rows)
        members = CategoryMembers(d)
        result = search(d, Path("q.jpg"), np.zeros(1000, np.float32), queries[0], members,
                        QueryOptions(n_results=15, min_candidates=150))  # fmt: skip
        gated = np.isin(rows, np.unique(np.concatenate([members[w]
                                                        for w in result.gating.wnids])))
        expected, scores = definition(queries[0], features[gated], 15, 3, centre.mean, head)
        # gating walks the centroids in the order of the mapped query
        order = centre.category_order(directed(centre.query(queries[0]), head))
        assert result.gating.wnids == choose_categories(order, members, 150)
    assert [h.id for h in result.hits] == ids[gated][expected].tolist()
    np.testing.assert_allclose([h.score for h in result.hits], scores, atol=2e-3)
    after = [gated_query(db, q) for q in queries]
    assert after != before  # the head changed what queries return

    assert training.reset(db) is True
    assert [gated_query(db, q) for q in queries] == before  # exactly: ids and scores
    assert training.reset(db) is False


def test_check_removes_a_tampered_query_head_and_a_catalog_without_one_still_queries(tmp_path):
    db, _, centres = clustered_database(tmp_path)
    query = (centres[1] / np.linalg.norm(centres[1])).astype(np.float32)
    plain = gated_query(db, query)
    with open_writer(db) as writer:
        writer.set_query_head(np.eye(DIM, dtype=np.float32) * 2, {"source": "test"})
    assert check_database(db) == []
    mapped = gated_query(db, query)  # a scaled identity maps no direction
    assert [i for i, _ in mapped] == [i for i, _ in plain]
    np.testing.assert_allclose([s for _, s in mapped], [s for _, s in plain], atol=1e-6)
    with sqlite3.connect(db / CATALOG_NAME) as conn:
        conn.execute("UPDATE query_head SET matrix = ?",
                     (np.full(DIM * DIM, np.nan, "<f4").tobytes(),))  # fmt: skip
    with Database.open(db) as d, pytest.raises(DatabaseError, match="invalid query head"):
        d.query_head()
    problems = check_database(db, repair=True)
    assert any("invalid query head" in p and "cbir train" in p for p in problems)
    assert check_database(db) == []
    assert gated_query(db, query) == plain
    with sqlite3.connect(db / CATALOG_NAME) as conn:
        conn.execute("DROP TABLE query_head")  # a catalog made before cbir train
    assert gated_query(db, query) == plain and check_database(db) == []
    table = "CREATE TABLE query_head (id INTEGER PRIMARY KEY, matrix BLOB, provenance TEXT); "
    zeros = np.zeros(DIM * DIM, "<f4").tobytes().hex()
    eye = np.eye(DIM, dtype="<f4").tobytes().hex()
    damaged = (
        "CREATE TABLE query_head (id INTEGER PRIMARY KEY, other TEXT)",  # another shape
        table + f"INSERT INTO query_head VALUES (1, x'{zeros}', '{{}}')",  # ranks nothing
        table + f"INSERT INTO query_head VALUES (1, x'{eye}', '{'[' * 100_000}')",  # too deep
    )
    for sql in damaged:
        with sqlite3.connect(db / CATALOG_NAME) as conn:
            conn.executescript("DROP TABLE IF EXISTS query_head; " + sql)
        assert any("cbir train" in p for p in check_database(db, repair=True))
        assert check_database(db) == [] and gated_query(db, query) == plain
    with sqlite3.connect(db / CATALOG_NAME) as conn:
        conn.executescript("DROP TABLE query_head; " + damaged[1])
    assert training.reset(db) is True  # --reset removes a damaged head too
    assert gated_query(db, query) == plain


def contrastive_loss(head: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """The training objective in numpy: normalise(head @ x_i) . x_j / T, rows labelled -1
    never positives nor anchors."""
    mapped = x @ head.T
    mapped /= np.linalg.norm(mapped, axis=1, keepdims=True)
    logits = mapped @ x.T / HEAD_TEMPERATURE
    np.fill_diagonal(logits, -np.inf)
    log_prob = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    same = (y[:, None] == y[None, :]) & (y[:, None] >= 0) & ~np.eye(len(y), dtype=bool)
    anchors = same.any(axis=1)
    per_anchor = np.where(same, log_prob, 0).sum(axis=1)[anchors] / same.sum(axis=1)[anchors]
    return float(-per_anchor.mean())


def test_the_trained_head_lowers_the_objective_the_search_ranks_by():
    rng = np.random.default_rng(21)
    d = 16
    x = rng.standard_normal((120, d))
    y = np.repeat([0, 1, 2, -1], 30)  # three classes and background
    x[:90] += 1.5 * rng.standard_normal((3, d)).repeat(30, axis=0)  # class directions
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    head, loss = train_query_head(x, y, epochs=40)
    assert head.shape == (d, d) and loss[-1] < loss[0]
    identity = contrastive_loss(np.eye(d), x, y)
    assert contrastive_loss(head, x, y) < identity - 0.05
    # the head maps column vectors: its transpose is not what was trained
    assert contrastive_loss(head, x, y) < contrastive_loss(head.T, x, y)


def test_cli_train_refuses_what_it_cannot_learn_from(tmp_path, capsys):
    db, images, _ = clustered_database(tmp_path)
    assert main(["train", str(db)]) == 1
    assert "labelled folder or --groups" in capsys.readouterr().err
    one_class = tmp_path / "one"
    (one_class / "cats").mkdir(parents=True)
    for img in images[:3]:
        shutil.copy(img.source_path, one_class / "cats" / f"{img.source_path.stem}.jpg")
    assert main(["train", str(db), str(one_class)]) == 1
    err = capsys.readouterr().err
    assert "at least 2 classes" in err and len(err.strip().splitlines()) == 1
    assert main(["train", str(db), str(one_class), "--reset"]) == 1
    assert "--reset takes no labelled images" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nowhere"), "--reset"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["train", str(db), str(one_class), "--epochs", "0"]) == 1
    assert "epochs must be between 1 and" in capsys.readouterr().err


def evaluate_json(db: Path, labelled: Path, capsys) -> dict:
    assert main(["evaluate", str(labelled), "--db", str(db), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@needs_shared
def test_cli_train_on_real_photos_describes_what_the_database_lacks(tmp_path, capsys, lite0):
    indexed = tmp_path / "indexed"  # four of the seven folders of photos
    for folder in ("animals", "food", "plants", "vehicles"):
        shutil.copytree(TESTDATA / "photos" / folder, indexed / folder)
    db = tmp_path / "db"
    assert main(["create-db", str(indexed), str(db), "--model", "efficientnet_lite0"]) == 0
    labelled = tmp_path / "labelled"  # all seven, and a file that is no image
    shutil.copytree(TESTDATA / "photos", labelled)
    shutil.copy(TESTDATA / "bad" / "truncated.jpg", labelled / "food" / "truncated.jpg")
    query = sorted((indexed / "animals").iterdir())[0]
    capsys.readouterr()
    assert main(["query", str(db), str(query), "--json"]) == 0
    plain_query = capsys.readouterr().out
    plain = evaluate_json(db, indexed, capsys)
    assert plain["query_head"] is None

    assert main(["train", str(db), str(labelled)]) == 0
    out, err = capsys.readouterr()
    n_indexed = sum(1 for _ in indexed.rglob("*.jpg"))
    n_photos = sum(1 for _ in (TESTDATA / "photos").rglob("*.jpg"))
    assert f"on {n_photos} images of 7 classes" in out
    assert f"({n_indexed} from the database, {n_photos - n_indexed} described)" in out
    assert "truncated.jpg" in err
    assert "check, a head trained on half the images of half the classes" in out
    trained = evaluate_json(db, indexed, capsys)
    assert trained["query_head"]["images"] == n_photos
    check = trained["query_head"]["check"]
    assert check["n_seen"] > 0 and check["n_unseen"] > 0 and 0 <= check["seen_after"] <= 1
    assert main(["evaluate", str(indexed), "--db", str(db), "--json", "--no-head"]) == 0
    assert json.loads(capsys.readouterr().out) == plain  # the same as before training
    # trained on these very labels: they must rank better than before
    assert trained["exhaustive"]["map"] > plain["exhaustive"]["map"] + 0.02
    assert main(["info", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["query_head"]["classes"] == 7

    assert main(["train", str(db), "--reset"]) == 0
    capsys.readouterr()
    assert main(["query", str(db), str(query), "--json"]) == 0
    assert capsys.readouterr().out == plain_query
    again = evaluate_json(db, indexed, capsys)
    assert again == plain


def test_the_check_scores_held_out_images_and_classes_left_out_of_a_first_training():
    rng = np.random.default_rng(31)
    d, per_class = 24, 20
    shared = rng.standard_normal((8, d))
    x = np.repeat(shared, per_class, axis=0) + 1.2 * rng.standard_normal((8 * per_class, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    y = np.repeat(np.arange(8), per_class)
    background = rng.standard_normal((100, d)).astype(np.float32)
    background /= np.linalg.norm(background, axis=1, keepdims=True)
    mean = np.concatenate([x, background]).mean(axis=0)
    check = training._held_out_check(x, y, background, mean, training.TrainOptions(epochs=20))
    assert check.n_unseen == 4 * per_class  # four classes left out whole
    assert check.n_seen == 4 * per_class // 2  # the other half of the other four
    assert check.seen_after > check.seen_before  # it learned the classes it saw
    assert 0 < check.unseen_after <= 1 and 0 < check.unseen_before <= 1
    assert training._held_out_check(x[:60], y[:60], background, mean,
                                    training.TrainOptions()) is None  # three classes
    pairs = np.concatenate([np.flatnonzero(y == c)[:2] for c in range(8)])
    assert training._held_out_check(x[pairs], y[pairs], background, mean,
                                    training.TrainOptions()) is None  # none can hold out
