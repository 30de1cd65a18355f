"""Gating by cells of categories: what would close the gap to 97 % of the exhaustive mAP at 70k
(issue 16), measured, not in the product yet.

Today a gated query walks whole categories by their centred centroid (cbir.centring); at 70k
that keeps 92 % of the exhaustive mAP in 2.8 % of the rows. Here each category is split by
spherical k-means (FAISS) into cells of about CELL images, and the query walks cells by their
centred centroid, until they hold the budget of distinct images. The query's own row is left
out of its cells' centroids, and of everything else, as cbir.evaluate.evaluate_corpus leaves
it out. Database: evaldata's 164 photos among the 70,000 Fashion-MNIST images, features from
bench/quality_grid.py's cache:

    python bench/gating_cells.py --large /tmp/fm70k [--cells 50 100 300] [--budgets 1000 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_grid import SHARED, describe, make_corpus  # noqa: E402
from quality_scale import joined  # noqa: E402

from cbir.evaluate import Corpus, SearchSettings, evaluate_corpus, labels_from_folders  # noqa: E402
from cbir.features import normalise  # noqa: E402
from cbir.search import choose_categories  # noqa: E402


def split_categories(corpus: Corpus, mean: np.ndarray, cell: int) -> list[npt.NDArray[np.int64]]:
    """The rows of each cell: every category cut by spherical k-means on its centred rows
    into ceil(size / cell) cells."""
    import faiss

    centred = normalise(corpus.features - mean.astype(np.float32))
    members: dict[str, list[int]] = {}
    for row, wnids in enumerate(corpus.memberships):
        for wnid in wnids:
            members.setdefault(wnid, []).append(row)
    cells = []
    for wnid in sorted(members):
        rows = np.array(members[wnid], np.int64)
        k = max(1, -(-len(rows) // cell))
        assign = np.zeros(len(rows), np.int64)
        if k > 1:
            kmeans = faiss.Kmeans(centred.shape[1], k, niter=10, spherical=True, seed=1)
            kmeans.train(centred[rows])
            assign = kmeans.index.search(centred[rows], 1)[1][:, 0]
        cells.extend(rows[assign == c] for c in range(k) if np.any(assign == c))
    return cells


def evaluate_cells(corpus: Corpus, cell: int, budget: int) -> str:
    features = corpus.features.astype(np.float64)
    mean = features.mean(axis=0)
    cells = split_categories(corpus, mean, cell)
    sums = np.stack([features[rows].sum(axis=0) for rows in cells])
    sizes = np.array([len(rows) for rows in cells])
    centroids = normalise((sums / sizes[:, None] - mean).astype(np.float32))
    names = [f"cell{i}" for i in range(len(cells))]
    own: dict[int, list[int]] = {}
    memberships: list[list[str]] = [[] for _ in corpus.labels]
    for i, rows in enumerate(cells):
        for row in rows.tolist():
            own.setdefault(row, []).append(i)
            memberships[row].append(names[i])

    def choose(q: int, available: dict[str, npt.NDArray[np.int64]]) -> tuple[str, ...]:
        row = int(corpus.queries[q])
        centred = normalise(corpus.query_features[q] - mean.astype(np.float32))
        scores = centroids @ centred
        for i in own.get(row, []):  # its cells' centroids without it
            if sizes[i] > 1:
                without = (sums[i] - features[row]) / (sizes[i] - 1) - mean
                scores[i] = normalise(without.astype(np.float32)) @ centred
        order = [names[i] for i in np.argsort(-scores, kind="stable")]
        return choose_categories(order, available, budget)

    started = time.perf_counter()
    cell_corpus = replace(corpus, memberships=[tuple(m) for m in memberships])
    ev = evaluate_corpus(cell_corpus, SearchSettings(min_candidates=budget), choose)
    return (f"| cells of ~{cell} ({len(cells):,}) | {budget} | {ev.gated.map:.3f} | "
            f"{ev.exhaustive.map:.3f} | {100 * ev.map_ratio:.1f} % | {100 * ev.top10_kept:.1f} % "
            f"| {100 * ev.gated.rows_share:.2f} % | {time.perf_counter() - started:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=Path, required=True, help="exported Fashion-MNIST 70k")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-quality-grid"))
    parser.add_argument("--cells", type=int, nargs="+", default=[50, 100, 300, 1000])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1000])
    args = parser.parse_args()
    eval_labels = labels_from_folders(SHARED / "evaldata")
    evaldata = describe(sorted(eval_labels), args.cache / "evaldata.npz")
    fashion = describe(sorted(labels_from_folders(args.large)), args.cache / "large.npz")
    data = joined(evaldata, fashion)
    corpus = make_corpus(data, [eval_labels[p] for p in evaldata.paths]
                         + [None] * len(fashion.paths), "gap", 4)  # fmt: skip
    default = evaluate_corpus(corpus, SearchSettings())
    print("| gating unit | budget | gated mAP | exhaustive mAP | % of exhaustive | gating recall "
          "| rows searched | time |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    print(f"| categories (the default) | 1000 | {default.gated.map:.3f} | "
          f"{default.exhaustive.map:.3f} | {100 * default.map_ratio:.1f} % | "
          f"{100 * default.top10_kept:.1f} % | {100 * default.gated.rows_share:.2f} % | |")
    for cell in args.cells:
        for budget in args.budgets:
            print(evaluate_cells(corpus, cell, budget), flush=True)


if __name__ == "__main__":
    main()
