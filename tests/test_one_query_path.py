"""Every front end ranks through one query path (cbir.query.rank_described): the same queries
through `cbir query`, the Python API (reading the matrix, and holding it in memory), a real
`cbir serve` over HTTP and `cbir evaluate` give the same images in the same order. The
database gates by an inverted file with new rows not yet in a list, with a budget small
enough that the gate matters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import cbir
from cbir.db import ivf
from tests.conftest import EVALDATA, TESTDATA, needs_shared
from tests.serving import Server

pytestmark = needs_shared
BUDGET = 5  # --min-candidates: the gate walks a few lists of 6, plus the new rows
N = 8


@pytest.fixture(scope="module")
def gated_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], list[Path]]:
    """24 evaldata photos in 4 classes (the lists are trained on them), then 8 photos of
    animals added after: new rows."""
    from cbir.cli import main

    root = tmp_path_factory.mktemp("one-path")
    labelled, labels = root / "labelled", {}
    for label in ("fruit", "vehicle", "musical_instrument", "tool"):
        (labelled / label).mkdir(parents=True)
        for image in sorted((EVALDATA / label).glob("*.jpg"))[:6]:
            shutil.copy(image, labelled / label / image.name)
            labels[str(labelled / label / image.name)] = label
    animals = root / "animals"
    shutil.copytree(TESTDATA / "photos" / "animals", animals)
    db = root / "db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ivf, "IVF_MIN_IMAGES", 16)
        patch.setattr(ivf, "NEW_ROWS_MIN", 20)
        assert main(["create-db", str(labelled), str(db), "--model", "efficientnet_lite0"]) == 0
        assert main(["add", str(db), str(animals)]) == 0
    queries = [*sorted(labelled.glob("*/*.jpg"))[::7], *sorted(animals.glob("*.jpg"))[:2]]
    return db, labels, queries


def test_query_api_server_and_evaluate_return_the_same_images_in_the_same_order(
    gated_db, capsys
):
    from cbir.cli import main
    from cbir.evaluate import RunOptions, SearchSettings, run_evaluation

    db, labels, queries = gated_db
    with cbir.open_db(db) as opened:
        info = opened.info()["inverted_file"]
        assert info["new_rows"] > 0 and info["lists"] > 1  # lists and new rows both gate
        api = [[h.id for h in opened.query(q, N, min_candidates=BUDGET).hits] for q in queries]
        api_by_id = {i: [h.id for h in opened.query_id(i, 10, min_candidates=BUDGET).hits]
                     for i in {h for hits in api for h in hits}}  # fmt: skip
        everything = [[h.id for h in opened.query(q, N, all=True, exact=True).hits]
                      for q in queries]  # fmt: skip
        first = opened.query(queries[0], N, min_candidates=BUDGET)
        assert first.gating.lists[0] == ivf.NEW_ROWS and first.n_searched < info["trained_on"]
        scores = [h.score for h in first.hits]
        assert scores == sorted(scores, reverse=True) and max(scores) <= 1.0
    with cbir.open_db(db, in_memory=True) as resident:  # the rows in memory, --all centred
        assert [[h.id for h in resident.query(q, N, min_candidates=BUDGET).hits]
                for q in queries] == api  # fmt: skip
        assert [[h.id for h in resident.query(q, N, all=True, exact=True).hits]
                for q in queries] == everything  # fmt: skip
    capsys.readouterr()
    assert main(["query", str(db), *map(str, queries), "--json", "-n", str(N),
                 "--min-candidates", str(BUDGET)]) == 0  # fmt: skip
    cli = [[r["id"] for r in json.loads(line)["results"]]
           for line in capsys.readouterr().out.splitlines()]  # fmt: skip
    assert cli == api
    server = Server(db)
    try:
        served = []
        for query in queries:
            status, result = server.upload(f"/api/query?n={N}&min_candidates={BUDGET}",
                                           query.read_bytes())  # fmt: skip
            assert status == 200
            served.append([r["id"] for r in result["results"]])
        served_by_id = {}
        for image_id in api_by_id:
            status, result = server.get(f"/api/query?id={image_id}&n=10&min_candidates={BUDGET}")
            served_by_id[image_id] = [r["id"] for r in result["results"]]
    finally:
        server.stop()
    assert served == api
    assert served_by_id == api_by_id
    report = run_evaluation(labels, RunOptions(search=SearchSettings(min_candidates=BUDGET)), db)
    assert report.gated_by == "lists"
    evaluated = report.evaluation.top10
    assert evaluated and set(evaluated) <= set(labels_ids(db, labels))
    for image_id, top in evaluated.items():
        if image_id in api_by_id:
            assert list(top) == api_by_id[image_id]
    assert any(image_id in api_by_id for image_id in evaluated)


def labels_ids(db: Path, labels: dict[str, str]) -> set[int]:
    with cbir.open_db(db) as opened:
        return {record.image_id for path, record in opened.database.paths() if path in labels}
