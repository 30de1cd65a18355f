"""Gating by the inverted file's lists against gating by whole categories (issue 16), on
features described once: evaldata's 164 photos among 10,000 and 70,000 Fashion-MNIST images,
and Fashion-MNIST 70k among itself (200 queries). The lists are trained as the writer trains
them (cbir.db.ivf: sqrt(n) lists on rows centred on the mean) and, to see lists that have not
been retrained since the database was a quarter of its size, with half as many. Features from
bench/quality_grid.py's cache; one run, 2 cores:

    python bench/gating_lists.py --large /tmp/fm70k
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_grid import SHARED, describe, make_corpus  # noqa: E402
from quality_scale import joined, subset  # noqa: E402
from simulation import Corpus, SearchSettings, evaluate_corpus, gate_by_lists  # noqa: E402

from cbir.db import ivf  # noqa: E402
from cbir.evaluate import Evaluation, labels_from_folders  # noqa: E402


def row(name: str, gate: str, ev: Evaluation, seconds: float) -> str:
    return (f"| {name} | {gate} | {ev.gated.map:.3f} | {ev.exhaustive.map:.3f} | "
            f"{100 * ev.map_ratio:.1f} % | {ev.gated.p_at_10:.3f} / {ev.exhaustive.p_at_10:.3f} | "
            f"{100 * ev.top10_kept:.1f} % | {100 * ev.gated.rows_share:.2f} % | {seconds:.0f} s |")


def compare(name: str, corpus: Corpus) -> None:
    started = time.perf_counter()
    print(row(name, "whole categories by centroid", evaluate_corpus(corpus, SearchSettings()),
              time.perf_counter() - started), flush=True)  # fmt: skip
    n = len(corpus.features)
    mean = corpus.features.astype(np.float64).mean(axis=0).astype(np.float32)
    for n_lists in (ivf.n_lists_for(n), ivf.n_lists_for(n) // 2):
        started = time.perf_counter()
        sample = np.sort(np.random.default_rng(1234).choice(
            n, min(n, n_lists * ivf.TRAIN_POINTS_PER_LIST), replace=False))  # fmt: skip
        inverted = ivf.InvertedFile.train(corpus.features[sample], mean, n_lists)
        lists = inverted.assign(corpus.features)[1]
        by_list = replace(corpus, memberships=[(f"list {x}",) for x in lists.tolist()])
        choose = gate_by_lists(inverted, corpus.query_features, None, 1000)
        ev = evaluate_corpus(by_list, SearchSettings(), choose)
        print(row(name, f"{n_lists} lists", ev, time.perf_counter() - started), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=Path, required=True, help="exported Fashion-MNIST 70k")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-quality-grid"))
    args = parser.parse_args()
    eval_labels = labels_from_folders(SHARED / "evaldata")
    evaldata = describe(sorted(eval_labels), args.cache / "evaldata.npz")
    fashion_labels = labels_from_folders(args.large)
    fashion = describe(sorted(fashion_labels), args.cache / "large.npz")
    labels = [eval_labels[p] for p in evaldata.paths]
    print("| database | gate | gated mAP | exhaustive mAP | % of exhaustive | P@10 gated / exh. "
          "| gating recall | rows searched | time |\n|---|---|---|---|---|---|---|---|---|")
    rows = np.sort(np.random.default_rng(0).choice(len(fashion.paths), 10_000, replace=False))
    compare("evaldata + 10,000", make_corpus(joined(evaldata, subset(fashion, rows)),
                                             labels + [None] * 10_000, "gap", 4))  # fmt: skip
    compare("evaldata + 70,000", make_corpus(joined(evaldata, fashion),
                                             labels + [None] * len(fashion.paths), "gap", 4))
    queries = np.arange(0, len(fashion.paths), 350)  # 200 queries, 20 per class
    compare("Fashion-MNIST 70,000 (200 queries)",
            make_corpus(fashion, [fashion_labels[p] for p in fashion.paths], "gap", 4, queries))


if __name__ == "__main__":
    main()
