"""The small options users expect: --min-score, --exclude-self, `cbir ls`, --help."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbir.cli import build_parser, main
from tests.conftest import needs_shared
from tests.test_cli import run_cli, run_json

pytestmark = needs_shared


def test_min_score_leaves_out_weaker_results(photos_db: Path, photos_dir: Path, capsys) -> None:
    query = str(photos_dir / "food" / "coffee.jpg")
    [everything] = run_json(capsys, "query", str(photos_db), query, "-n", "20", "--json")
    assert len(everything["results"]) == 20
    scores = [r["score"] for r in everything["results"]]
    assert scores == sorted(scores, reverse=True) and scores[0] <= 1  # what they were ranked by
    threshold = sorted(r["cosine"] for r in everything["results"])[-4] + 1e-6
    [strong] = run_json(capsys, "query", str(photos_db), query, "-n", "20", "--json",
                        "--min-score", str(threshold))  # fmt: skip
    kept = [r["id"] for r in everything["results"] if r["cosine"] >= threshold]
    assert [r["id"] for r in strong["results"]] == kept  # filtered on the plain cosine
    assert 1 <= len(kept) < 20 and all(r["cosine"] >= threshold for r in strong["results"])


def test_exclude_self_leaves_out_the_querys_own_content(photos_db: Path, photos_dir: Path,
                                                       capsys) -> None:  # fmt: skip
    query = str(photos_dir / "animals" / "chelsea.jpg")
    [plain] = run_json(capsys, "query", str(photos_db), query, "-n", "5", "--json")
    [without] = run_json(capsys, "query", str(photos_db), query, "-n", "5", "--json",
                         "--exclude-self")  # fmt: skip
    assert plain["results"][0]["path"] == query and plain["results"][0]["score"] > 0.999
    assert [r["id"] for r in without["results"]] == [r["id"] for r in plain["results"][1:]] + [
        without["results"][-1]["id"]]
    assert query not in [r["path"] for r in without["results"]] and len(without["results"]) == 5


def test_ls_lists_categories_largest_first_and_one_categorys_images(photos_db: Path,
                                                                   capsys) -> None:  # fmt: skip
    listed = run_json(capsys, "ls", str(photos_db), "--json")
    [info] = run_json(capsys, "info", str(photos_db), "--json")
    assert listed == info["categories"]
    assert main(["ls", str(photos_db), "Egyptian cat"]) == 0
    cats = capsys.readouterr().out.splitlines()
    assert cats and any(line.endswith("chelsea.jpg") for line in cats)
    images = run_json(capsys, "ls", str(photos_db), "n02124075", "--json")
    assert [im["path"] for im in images] == cats
    assert all("n02124075" in im["categories"] for im in images)
    text = run_cli("ls", str(photos_db)).stdout.splitlines()
    first = next(c for c in listed)
    assert text[0].split() == [str(first["images"]), first["id"], first["name"]]


@pytest.mark.parametrize("name, message", [
    ("crane", "2 categories are called 'crane': n02012849, n03126707"),
    ("no such thing", "no ImageNet category is called 'no such thing'"),
    ("tench", "the database has no image in n01440764 tench"),
])  # fmt: skip
def test_ls_of_a_category_it_cannot_list_is_one_line(photos_db: Path, name, message) -> None:
    done = run_cli("ls", str(photos_db), name)
    assert done.returncode == 1
    assert done.stderr.startswith(f"cbir: error: {message}") and done.stderr.count("\n") == 1


def test_help_shows_defaults_and_an_example_for_every_command() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    for name, sub in commands.items():
        text = sub.format_help()
        assert f"example:\n  cbir {name} " in text, name
    query_help = commands["query"].format_help()
    assert "results per query (default: 10)" in query_help
    assert "(default: -1.0)" in query_help  # --min-score
    create_help = " ".join(commands["create-db"].format_help().split())
    assert "--commit-every N commit to disk every N new images (and at least once a minute) " \
           "(default: 1024)" in create_help


def test_a_weights_file_works_end_to_end(tmp_path: Path, photos_dir: Path, capsys) -> None:
    """--weights FILE: create-db records the file's full SHA-256, add and query need the same
    file, and evaluate builds with it."""
    import shutil
    from importlib import resources

    weights = tmp_path / "mine.weights.h5"
    with resources.as_file(resources.files("cbir") / "data" /
                           "efficientnet_lite0_imagenet.weights.h5") as shipped:  # fmt: skip
        shutil.copy(shipped, weights)
    source, more = tmp_path / "source", tmp_path / "more"
    shutil.copytree(photos_dir / "animals", source)
    shutil.copytree(photos_dir / "food", more)
    db = str(tmp_path / "w.db")
    model = ["--model", "efficientnet_lite0", "--weights", str(weights)]
    assert main(["create-db", str(source), db, *model]) == 0
    assert main(["add", db, str(more), "--weights", str(weights)]) == 0
    query = str(source / "chelsea.jpg")
    [result] = run_json(capsys, "query", db, query, "--weights", str(weights), "--json")
    assert result["results"][0]["paths"] == [query]
    [info] = run_json(capsys, "info", db, "--json")
    assert len(info["weights"]) == len("sha256:") + 64
    assert main(["query", db, query]) == 1
    assert "pass the same file with --weights" in capsys.readouterr().err
    labelled = tmp_path / "labelled"
    for kind in ("animals", "food"):
        shutil.copytree(photos_dir / kind, labelled / kind)
    [scores] = run_json(capsys, "evaluate", str(labelled), *model, "--json")
    assert scores["n_images"] == len(list(labelled.rglob("*.jpg")))
