"""`cbir find`: images by concept through WordNet, on the real photos."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbir.categories import names_by_wnid
from cbir.concepts import match
from cbir.errors import CbirError
from tests.conftest import needs_shared
from tests.test_cli import run_cli, run_json

pytestmark = needs_shared


def test_cat_finds_the_cat_photo_first(photos_db: Path, capsys) -> None:
    [found] = run_json(capsys, "find", str(photos_db), "cat", "-n", "3", "--json")
    assert Path(found["results"][0]["path"]).name == "chelsea.jpg"
    assert found["results"][0]["score"] > 0.9
    names = {c["name"] for c in found["classes"]}
    assert {"tabby", "Egyptian_cat", "Siamese_cat"} <= names
    assert found["query"] == "cat" and found["concepts"][0]["name"] == "cat"


def test_dog_matches_the_breeds_under_it(photos_db: Path, capsys) -> None:
    [found] = run_json(capsys, "find", str(photos_db), "dogs", "--json")  # a plural too
    names = {c["name"] for c in found["classes"]}
    assert len(names) > 100 and {"Chihuahua", "golden_retriever", "cocker_spaniel"} <= names
    assert Path(found["results"][0]["path"]).name == "dogs_window.jpg"
    assert "tabby" not in names


def test_concepts_higher_up_the_hierarchy(photos_db: Path, capsys) -> None:
    [vehicles] = run_json(capsys, "find", str(photos_db), "vehicle", "-n", "4", "--json")
    assert {Path(r["path"]).parent.name for r in vehicles["results"]} == {"vehicles"}
    _, classes = match(["musical", "instrument"])  # a phrase WordNet has
    assert {"acoustic_guitar", "cello", "violin"} <= {names_by_wnid()[c] for c in classes}


def test_an_unknown_word_gets_the_closest_known_ones() -> None:
    with pytest.raises(CbirError, match="did you mean dingo, dugong, dog"):
        match(["dgo"])
    with pytest.raises(CbirError, match="did you mean musical instrument"):
        match(["musicl", "instrument"])


def test_cli_text_and_errors(photos_db: Path) -> None:
    done = run_cli("find", str(photos_db), "fruit", "-n", "2")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0].startswith("find 'fruit': fruit -> ") and len(lines) == 3
    bad = run_cli("find", str(photos_db), "qwxz")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("cbir: error: no ImageNet class or WordNet concept is called")


def test_classes_below_an_images_top_k_still_find_it(photos_db: Path) -> None:
    """The catalog keeps 32 class probabilities per image, not only its top-4 categories."""
    from cbir.categories import wnids
    from cbir.concepts import find
    from cbir.db import Database

    with Database.open(photos_db) as db:
        ids, top, probs = db.catalog.class_probabilities()
        assert top.shape == (37, 32) and (top >= 0).all()
        np_order = probs.argsort(axis=1)[:, ::-1]
        assert (np_order[:, 0] == 0).all()  # stored most probable first
        image, fifth = 0, int(top[0, 4])
        record = db.image(int(ids[image]))
        assert wnids()[fifth] not in record.wnids  # not one of its categories
        found = find(db, [names_by_wnid()[wnids()[fifth]]], n=37)
        assert int(ids[image]) in [h.id for h in found.hits]


def test_plurals_and_hyphenated_words() -> None:
    _, oranges = match(["oranges"])
    assert [names_by_wnid()[c] for c in oranges] == ["orange"]  # not orangutan ("orang")
    _, shirts = match(["t-shirt"])
    assert "jersey" in {names_by_wnid()[c] for c in shirts}
