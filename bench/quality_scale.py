"""Retrieval quality as the database grows: the defaults of `cbir query` (centred on the database
mean, categories by centroid, min_candidates distinct images, query expansion 3) against the
search before centring (plain cosines, the query's top-4 categories by class probability), with
evaldata's 164 labelled photos among 0, 1,000, 10,000 and 70,000 Fashion-MNIST distractors, the
small labelled sets alone, and Fashion-MNIST's 70,000 queried among themselves. The candidate
budget (`--min-candidates`) is swept.

Ranking and gating are bench/simulation.py's evaluate_corpus (what `cbir evaluate` runs) on features
described once by bench/quality_grid.py's cache:

    python bench/export_fashion_mnist.py /tmp/fm70k --per-class 6000 --split train
    python bench/export_fashion_mnist.py /tmp/fm70k --per-class 1000 --split test
    python bench/export_fashion_mnist.py /tmp/fm1k --per-class 100 --split test
    python bench/quality_scale.py --large /tmp/fm70k --fashion /tmp/fm1k > scale.md

Describing the 71,265 images takes about 13 minutes on 2 cores (cached in
/tmp/cbir-quality-grid); the evaluations about 15 more.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_grid import (  # noqa: E402
    SHARED,
    Described,
    describe,
    make_corpus,
    near_duplicate_labels,
    probability_rule,
)
from simulation import SearchSettings, evaluate_corpus  # noqa: E402

from cbir.evaluate import labels_from_folders  # noqa: E402

BUDGETS = (250, 500, 1000, 2000)


def subset(data: Described, rows: np.ndarray) -> Described:
    return Described([data.paths[i] for i in rows], data.probs[rows], data.gap[rows],
                     data.gem[rows])  # fmt: skip


def joined(a: Described, b: Described) -> Described:
    return Described(a.paths + b.paths, np.concatenate([a.probs, b.probs]),
                     np.concatenate([a.gap, b.gap]), np.concatenate([a.gem, b.gem]))  # fmt: skip


def table(
    name: str, data: Described, labels: list[str | None], queries: np.ndarray | None = None,
    budgets: tuple[int, ...] = BUDGETS,
) -> str:
    """One markdown table: before centring, then the default at each candidate budget."""
    corpus = make_corpus(data, labels, "gap", 4, queries)
    n = len(labels)
    lines = [f"\n### {name}: {n:,} images\n",
             "| search | budget | gated mAP | exhaustive mAP | % of exhaustive | P@10 | "
             "gating recall | rows searched |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    plain = SearchSettings(centre=False, min_candidates=1000)
    runs = [("before centring: top-4 by probability", 1000,
             evaluate_corpus(corpus, plain, probability_rule(corpus, 4, 1000)))]  # fmt: skip
    for budget in budgets:
        if budget >= n and budget != 1000:
            continue
        started = time.perf_counter()
        ev = evaluate_corpus(corpus, SearchSettings(min_candidates=budget))
        runs.append(("centred, categories by centroid", budget, ev))
        print(f"{name} {budget}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    for what, budget, ev in runs:
        g = ev.gated
        lines.append(f"| {what} | {budget} | {g.map:.3f} | {ev.exhaustive.map:.3f} | "
                     f"{100 * ev.map_ratio:.1f} % | {g.p_at_10:.3f} | {100 * ev.top10_kept:.1f} % "
                     f"| {g.rows_searched:,.0f} ({100 * g.rows_share:.1f} %) |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=Path, required=True, help="exported Fashion-MNIST 70k")
    parser.add_argument("--fashion", type=Path, help="exported Fashion-MNIST 1k (small set)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-quality-grid"))
    args = parser.parse_args()
    eval_labels = labels_from_folders(SHARED / "evaldata")
    evaldata = describe(sorted(eval_labels), args.cache / "evaldata.npz")
    labels = [eval_labels[p] for p in evaldata.paths]
    near = near_duplicate_labels(SHARED / "testdata")
    small = {"near-duplicates": (near, "near-duplicates")}
    if args.fashion:
        small["fashion-mnist 1k"] = (labels_from_folders(args.fashion), "fashion")
    for name, (set_labels, cache) in small.items():
        data = describe(sorted(set_labels), args.cache / f"{cache}.npz")
        print(table(name, data, [set_labels[p] for p in data.paths]), flush=True)
    print(table("evaldata", evaldata, labels), flush=True)
    fashion_labels = labels_from_folders(args.large)
    fashion = describe(sorted(fashion_labels), args.cache / "large.npz")
    rng = np.random.default_rng(0)
    for k in (1000, 10000, len(fashion.paths)):
        rows = np.sort(rng.choice(len(fashion.paths), k, replace=False))
        data = joined(evaldata, subset(fashion, rows))
        print(table(f"evaldata + {k:,} Fashion-MNIST", data, labels + [None] * k), flush=True)
    queries = np.arange(0, len(fashion.paths), 350)  # 200 queries, 20 per class
    print(table("Fashion-MNIST 70,000 (200 queries)", fashion,
                [fashion_labels[p] for p in fashion.paths], queries, (1000, 5000)), flush=True)


if __name__ == "__main__":
    main()
