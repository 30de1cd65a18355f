"""Gated search as a library grows (issue 29): a database built the way a user's is, in steps of
different content, scored after every step by `cbir evaluate --db`'s code
(cbir.evaluate.evaluate_db: every query through the query path of `cbir query`, gated and
exhaustively, by its stored feature).

    apt-get install dataset-fashion-mnist
    python bench/export_fashion_mnist.py /tmp/fm/train --per-class 6000 --split train
    python bench/export_fashion_mnist.py /tmp/fm/test --per-class 1000 --split test
    python bench/bench_growth.py --fashion /tmp/fm [--gates new,old]

The steps: Fashion-MNIST's training images two classes at a time (the inverted file is
trained when the database passes 10,000 images, and again at 4-fold growth), the 37 test
photos in the middle, evaldata's 164 photos of new kinds after the 60,000 (the case the
issue measured: 32 % of the exhaustive mAP), the 10,000 test images, a removal of 90 % of
one class, and those images added again. Scores: evaldata and the photos, each image
against the database with its folder as label; Fashion-MNIST, 200 of its images (20 per
class) with their class as label (thousands of relevant images each, so its mAP in the
first 1000 rows is low for either search: read its ratio and the top-10 kept).

`--gates old` builds the same database with the gate of format 7 before issue 29 (images
put in their nearest list at once, whatever their fit) for the comparison in the same run.
Descriptions come from bench/quality_grid.py's cache (efficientnet_lite0, described once:
about 25 minutes for the 70,164 images on 2 cores). Every database is built through the
real writer (cbir.db.open_writer), copies as symbolic links, in a temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_grid import SHARED, Described, describe  # noqa: E402

from cbir import categories  # noqa: E402
from cbir.db import Database, NewImage, Settings, ivf, open_writer  # noqa: E402
from cbir.db import writer as writer_module  # noqa: E402
from cbir.evaluate import Evaluation, SearchSettings, evaluate_db, labels_from_folders  # noqa: E402
from cbir.features import normalise  # noqa: E402

CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle_boot")  # fmt: skip
FASHION_QUERIES_PER_CLASS = 20


@dataclass(frozen=True)
class Collection:
    """Described images of one source: paths, labels (folder), features (n, d), probs."""

    name: str
    paths: list[str]
    labels: list[str]
    described: Described


def collection(name: str, folder: Path, cache: Path) -> Collection:
    labels = labels_from_folders(folder)
    described = describe(sorted(labels), cache / f"{name}.npz")
    return Collection(name, described.paths, [labels[p] or "" for p in described.paths],
                      described)  # fmt: skip


def new_images(c: Collection, rows: np.ndarray) -> list[NewImage]:
    """The images of `c` at `rows`, as the indexer would hand them to the writer."""
    wnids = categories.wnids()
    features = normalise(c.described.pooled("gap")[rows])
    images = []
    for feature, row in zip(features, rows.tolist(), strict=True):
        path = Path(c.paths[row])
        data = path.read_bytes()
        top = np.argsort(-c.described.probs[row])[:4]
        info = path.stat()
        images.append(NewImage(path, hashlib.sha256(data).hexdigest(), info.st_size,
                               info.st_mtime_ns, tuple(wnids[j] for j in top),
                               tuple(float(c.described.probs[row][j]) for j in top),
                               feature))  # fmt: skip
    return images


def old_gate() -> None:
    """The gate before issue 29: every new image in its nearest list at its commit (no new
    rows, no lists of their own for rows that fit none)."""
    ivf.NEW_ROWS_MIN = ivf.NEW_ROWS_MAX = 0
    train = ivf.InvertedFile.train.__func__

    def train_fitting_all(cls, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN206
        return replace(train(cls, *args, **kwargs), fit=-1.0)

    ivf.InvertedFile.train = classmethod(train_fitting_all)


class Maintenance:
    """Times the writer's list maintenance (training, covering new rows) as it happens."""

    def __init__(self) -> None:
        self.events: list[str] = []
        for name in ("train_ivf", "cover_new_rows"):
            self._wrap(name)

    def _wrap(self, name: str) -> None:
        real: Callable = getattr(writer_module.Writer, name)
        events = self.events

        def timed(writer, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            new_rows = writer.catalog.count_in_list(ivf.NEW_ROWS)
            start = time.perf_counter()
            real(writer, *args, **kwargs)
            lists = len(writer.db.ivf())
            events.append(f"{name} at {writer.n_images()} images ({new_rows} new rows): "
                          f"{1000 * (time.perf_counter() - start):.0f} ms, {lists} lists")
            return None

        setattr(writer_module.Writer, name, timed)


def row(step: str, n: int, state: str, name: str, ev: Evaluation) -> str:
    g, e = ev.gated, ev.exhaustive
    return (f"| {step} | {n:,} | {state} | {name} ({ev.n_queries}) | {g.map:.3f} | {e.map:.3f} | "
            f"{100 * ev.map_ratio:.1f} % | {g.p_at_10:.3f} / {e.p_at_10:.3f} | "
            f"{100 * ev.top10_kept:.1f} % | {g.rows_searched:,.0f} ({100 * g.rows_share:.1f} %) |")


def run(gate: str, sets: dict[str, Collection], work: Path, maintenance: Maintenance) -> None:
    fashion, test = sets["fashion"], sets["fashion_test"]
    by_class = {c: np.flatnonzero(np.array(fashion.labels) == c) for c in CLASSES}
    removed = by_class["trouser"][: int(0.9 * len(by_class["trouser"]))]
    steps: list[tuple[str, Callable]] = []
    for i in range(0, 10, 2):
        if i == 4:
            steps.append(("+ 37 photos", lambda w: w.add_images(new_images(
                sets["photos"], np.arange(len(sets["photos"].paths))))))  # fmt: skip
        pair = CLASSES[i : i + 2]
        rows = np.concatenate([by_class[c] for c in pair])
        steps.append((f"+ {' + '.join(pair)}", lambda w, r=rows: add(w, fashion, r)))
    steps.append(("+ 164 evaldata", lambda w: w.add_images(new_images(
        sets["evaldata"], np.arange(len(sets["evaldata"].paths))))))  # fmt: skip
    steps.append(("+ 10k Fashion test", lambda w: add(w, test, np.arange(len(test.paths)))))
    steps.append((f"- {len(removed):,} trousers",
                  lambda w: w.remove_paths(fashion.paths[i] for i in removed.tolist())))
    steps.append((f"+ those {len(removed):,} again", lambda w: add(w, fashion, removed)))

    db_dir = work / f"growth-{gate}"
    settings = Settings("efficientnet_lite0", "imagenet", 1280, top_k=4, link="symlink")
    print(f"\n### gate: {gate}\n")
    print("| step | images | inverted file | queries | gated mAP | exhaustive mAP | % of exh. "
          "| P@10 gated / exh. | top-10 kept | rows searched (gated) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for step, apply in steps:
        start = time.perf_counter()
        with open_writer(db_dir, settings) as writer:
            apply(writer)
        seconds = time.perf_counter() - start
        with Database.open(db_dir) as db:
            n = db.n_images()
            ids = {p: r.image_id for p, r in db.paths()}
            generation, trained = db.catalog.ivf_state()
            state = "none" if generation == 0 else (
                f"{len(db.ivf())} lists, trained on {trained:,}, "
                f"{db.catalog.count_in_list(ivf.NEW_ROWS)} new rows")  # fmt: skip
            for name in ("evaldata", "photos", "fashion"):
                labels, queries = labelled(sets, name, ids)
                if len(queries) < 2:
                    continue
                started = time.perf_counter()
                ev = evaluate_db(db, labels, SearchSettings(), queries=queries)
                print(row(step, n, state, name, ev), flush=True)
                print(f"  {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
        for event in maintenance.events:
            print(f"  {gate}: {event}", file=sys.stderr)
        print(f"  {step}: written in {seconds:.1f} s", file=sys.stderr, flush=True)
    print("\nlist maintenance (time, lists after):")
    for event in maintenance.events:
        print(f"- {event}")
    maintenance.events.clear()


def add(writer, c: Collection, rows: np.ndarray) -> None:  # noqa: ANN001
    for start in range(0, len(rows), 1024):  # create-db commits about this many at a time
        writer.add_images(new_images(c, rows[start : start + 1024]))


def labelled(
    sets: dict[str, Collection], name: str, ids: dict[str, int]
) -> tuple[dict[int, str], list[int]]:
    """(image id -> label, the ids to query) of the set `name` as the database holds it."""
    if name != "fashion":
        c = sets[name]
        labels = {ids[p]: label for p, label in zip(c.paths, c.labels, strict=True) if p in ids}
        return labels, list(labels)
    labels = {}
    for c in (sets["fashion"], sets["fashion_test"]):
        labels.update({ids[p]: label for p, label in zip(c.paths, c.labels, strict=True)
                       if p in ids})  # fmt: skip
    rng = np.random.default_rng(0)
    queries = []
    for cls in CLASSES:
        present = [i for i, label in labels.items() if label == cls]
        if present:
            k = min(FASHION_QUERIES_PER_CLASS, len(present))
            queries += rng.choice(present, k, replace=False).tolist()
    return labels, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion", type=Path, required=True,
                        help="Fashion-MNIST exported with train/ and test/ (see above)")
    parser.add_argument("--gates", default="new,old", help="new (this cbir), old, or both")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-growth"))
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    sets = {
        "fashion": collection("fm_train", args.fashion / "train", args.cache),
        "fashion_test": collection("fm_test", args.fashion / "test", args.cache),
        "evaldata": collection("evaldata", SHARED / "evaldata", args.cache),
        "photos": collection("photos", SHARED / "testdata" / "photos", args.cache),
    }
    print(f"{platform.node()}: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; efficientnet_lite0 features; budget 1000, expansion 3")
    maintenance = Maintenance()
    with tempfile.TemporaryDirectory(prefix="cbir-growth-", dir=args.work_dir) as tmp:
        for gate in args.gates.split(","):
            if gate == "old":
                old_gate()
            run(gate, sets, Path(tmp), maintenance)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of the run: {peak:.0f} MB")


if __name__ == "__main__":
    main()
