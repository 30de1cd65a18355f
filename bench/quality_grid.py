"""The quality grid behind docs/quality.md: pooling x PCA/whitening x query expansion x gating.

Every image is described once with the embedded efficientnet_lite0 (class probabilities, GAP and
GeM features; cached as .npz), then each configuration is a database simulated in memory by
bench/simulation.py's evaluate_corpus: rows stored in their top-k categories, queries gated with
cbir.search.choose_categories (the function `cbir query` uses) or an experimental rule below,
the query's own row left out.

    python bench/quality_grid.py                        # evaldata + near-duplicates
    python bench/export_fashion_mnist.py /tmp/fm1k --per-class 100
    python bench/export_fashion_mnist.py /tmp/fm70k --per-class 6000 --split train
    python bench/export_fashion_mnist.py /tmp/fm70k --per-class 1000 --split test
    python bench/quality_grid.py --fashion /tmp/fm1k --large /tmp/fm70k --json grid.json
    python bench/quality_grid.py --write-groups near_duplicates.csv  # for evaluate --groups

Markdown tables go to stdout; the full run with --large takes about 30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simulation import ChooseCategories, Corpus, SearchSettings, evaluate_corpus  # noqa: E402

from cbir import categories  # noqa: E402
from cbir.evaluate import Evaluation, labels_from_folders  # noqa: E402
from cbir.features import apply_whitening, learn_whitening  # noqa: E402

SHARED = REPO.parent / "shared"
BACKBONE = "efficientnet_lite0"
BATCH = 64


@dataclass(frozen=True)
class Described:
    """n images described once. probs (n, 1000); gap, gem (n, 1280) unit-norm rows."""

    paths: list[str]
    probs: npt.NDArray[np.float32]
    gap: npt.NDArray[np.float32]
    gem: npt.NDArray[np.float32]

    def pooled(self, pooling: str) -> npt.NDArray[np.float32]:
        return self.gap if pooling == "gap" else self.gem


def near_duplicate_labels(testdata: Path) -> dict[str, str | None]:
    """Each photo with `<stem>__*` variants forms a group with them; other photos are
    distractors (None)."""
    variants = sorted((testdata / "near_duplicates").glob("*__*.jpg"))
    stems = {v.name.split("__")[0] for v in variants}
    labels: dict[str, str | None] = {}
    for photo in sorted((testdata / "photos").rglob("*.jpg")):
        labels[os.path.abspath(photo)] = photo.stem if photo.stem in stems else None
    for variant in variants:
        labels[os.path.abspath(variant)] = variant.name.split("__")[0]
    return labels


def write_groups(labels: Mapping[str, str | None], target: Path) -> None:
    """A `path,group` CSV for `cbir evaluate --groups`, paths relative to its own folder."""
    base = os.path.abspath(target.parent)
    with open(target, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["path", "group"])
        for path, group in sorted(labels.items()):
            out.writerow([os.path.relpath(path, base), group or ""])


def describe(paths: list[str], cache: Path) -> Described:
    """Describe `paths` with efficientnet_lite0, or load the cached result for the same paths."""
    if cache.is_file():
        with np.load(cache) as z:
            if list(z["paths"]) == paths:
                return Described(paths, z["probs"], z["gap"], z["gem"])
    from cbir.images import load_image
    from cbir.model import load_model

    model = load_model(BACKBONE)
    parts: dict[str, list[np.ndarray]] = {"probs": [], "gap": [], "gem": []}
    start = time.perf_counter()
    size = model.backbone.input_size
    for i in range(0, len(paths), BATCH):
        pixels = np.stack([load_image(Path(p), size) for p in paths[i : i + BATCH]])
        out = model.describe(pixels)
        parts["probs"].append(out.probs)
        parts["gap"].append(out.features["gap"])
        parts["gem"].append(out.features["gem"])
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    seconds = time.perf_counter() - start
    print(f"described {len(paths)} images in {seconds:.0f} s ({model.engine} {model.precision})",
          file=sys.stderr)  # fmt: skip
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, paths=np.array(paths), **arrays)
    return Described(paths, arrays["probs"], arrays["gap"], arrays["gem"])


def make_corpus(
    described: Described,
    labels: Sequence[str | None],
    pooling: str,
    top_k: int,
    queries: npt.NDArray[np.int64] | None = None,
) -> Corpus:
    """The database of these images built with `top_k`; every labelled row is a query unless
    `queries` (rows) says otherwise."""
    wnids = np.array(categories.wnids())
    top = np.argsort(-described.probs, axis=1)[:, :top_k]
    if queries is None:
        queries = np.array([i for i, label in enumerate(labels) if label is not None], np.int64)
    features = described.pooled(pooling)
    return Corpus(
        labels=list(labels),
        features=features,
        memberships=[tuple(row) for row in wnids[top]],
        queries=queries,
        query_features=features[queries],
        query_probs=described.probs[queries],
    )


# -- gating rules beyond cbir.search.choose_categories --------------------------------------


def mass_rule(corpus: Corpus, mass: float, min_candidates: int) -> ChooseCategories:
    """The query's most probable categories until they hold `mass` of its probability (at
    least one), widened by probability like probability_rule to `min_candidates` images."""

    def top_k(q: int) -> int:
        probs = corpus.query_probs[q]
        return int(np.searchsorted(np.cumsum(np.sort(probs)[::-1]), mass) + 1)

    return probability_rule(corpus, top_k, min_candidates)


def centroid_rule(corpus: Corpus, min_candidates: int) -> ChooseCategories:
    """Categories by the cosine between the query's feature and each category's mean stored
    feature (its centroid, the query's own row left out), best first, until they hold
    `min_candidates` images (at least one category). A database could keep these centroids
    (sum and count per category) beside its category files."""
    names = sorted({w for member in corpus.memberships for w in member if w})
    index = {w: i for i, w in enumerate(names)}
    sums = np.zeros((len(names), corpus.features.shape[1]), np.float64)
    for r, member in enumerate(corpus.memberships):
        for wnid in member:
            sums[index[wnid]] += corpus.features[r]

    def choose(q: int, available: Mapping[str, np.ndarray]) -> Sequence[str]:
        row = int(corpus.queries[q])
        own = [index[w] for w in set(corpus.memberships[row]) if w]
        local = sums.copy()
        local[own] -= corpus.features[row]
        norms = np.maximum(np.linalg.norm(local, axis=1), 1e-12)
        order = np.argsort(-(local @ corpus.query_features[q]) / norms, kind="stable")
        chosen: list[str] = []
        count = 0
        for i in order:
            if chosen and count >= min_candidates:
                break
            if names[i] in available:
                chosen.append(names[i])
                count += len(available[names[i]])
        return chosen

    return choose


def probability_rule(
    corpus: Corpus, top_k: int | Callable[[int], int], min_candidates: int
) -> ChooseCategories:
    """The gate of cbir before centring: the query's top-k categories by class probability,
    widened by probability until they hold `min_candidates` images, each image counted once
    (top_k: a number, or one per query number)."""
    wnids = categories.wnids()
    rows_of: dict[str, list[int]] = {}
    for r, member in enumerate(corpus.memberships):
        for wnid in member:
            rows_of.setdefault(wnid, []).append(r)
    members = {w: np.array(r, np.int64) for w, r in rows_of.items()}

    def choose(q: int, available: Mapping[str, np.ndarray]) -> Sequence[str]:
        own_row = int(corpus.queries[q])
        k = top_k(q) if callable(top_k) else top_k
        seen = np.zeros(len(corpus.labels), bool)
        chosen: list[str] = []
        for rank, i in enumerate(np.argsort(-corpus.query_probs[q])):
            wnid = wnids[i]
            if wnid not in available:
                continue
            if rank >= k and chosen and np.count_nonzero(seen) >= min_candidates:
                break
            chosen.append(wnid)
            seen[members[wnid]] = True
            seen[own_row] = False
        return chosen

    return choose


def row(name: str, ev: Evaluation, **extra: object) -> dict:
    return {"dataset": name, **extra, **ev.to_json()}


# -- experiments -------------------------------------------------------------------------------

# name, pca, dim, whitening power: "pca" is centring + rotation (cosines of centred features)
PROJECTIONS: tuple[tuple[str, bool, int | None, float], ...] = (
    ("none", False, None, 0.0), ("pca", True, None, 0.0), ("pca 256", True, 256, 0.0),
    ("pca 64", True, 64, 0.0), ("whiten", True, None, 0.5), ("whiten 64", True, 64, 0.5),
)  # fmt: skip
EXPANSIONS = (0, 1, 3, 5)


def feature_grid(name: str, described: Described, labels: list[str | None]) -> list[dict]:
    """pooling x PCA/whitening x query expansion; gated = the original gate (top-4 categories
    at build and query time, no widening), so its gating recall shows what that gate lost."""
    results = []
    for pooling in ("gap", "gem"):
        corpus = make_corpus(described, labels, pooling, top_k=4)
        for projection, pca, dim, power in PROJECTIONS:
            if dim is not None and dim >= len(labels) - 1:
                continue  # as many axes as the data has: the same as no reduction
            for qe in EXPANSIONS:
                settings = SearchSettings(
                    centre=False, top_k=4, min_candidates=0, query_expansion=qe, pca=pca,
                    pca_dim=dim, whiten_power=power,
                )  # fmt: skip
                ev = evaluate_corpus(corpus, settings, probability_rule(corpus, 4, 0))
                results.append(row(name, ev, pooling=pooling, projection=projection, qe=qe))
    return results


def gating_grid(name: str, described: Described, labels: list[str | None]) -> list[dict]:
    """Gating rules on a small database (current features: GAP, no PCA, no QE): top-k with
    min_candidates as a share of its rows, probability mass, category centroids, and the
    default (top-4, 1000 candidates: the whole database)."""
    n = len(labels)
    shares = (0, n // 10, n // 4, n // 2)
    results = []
    settings = SearchSettings(centre=False)
    for k in range(1, 11):
        corpus = make_corpus(described, labels, "gap", k)
        for m in shares:
            ev = evaluate_corpus(corpus, replace(settings, top_k=k, min_candidates=m),
                                 probability_rule(corpus, k, m))  # fmt: skip
            results.append(row(name, ev, rule=f"top-{k}", min_candidates=m))
        if k in (1, 4):
            for m in shares[1:]:
                ev = evaluate_corpus(corpus, settings, centroid_rule(corpus, m))
                results.append(row(name, ev, rule=f"centroids, top-{k} storage", min_candidates=m))
        if k == 4:
            ev = evaluate_corpus(corpus, settings, probability_rule(corpus, 4, 1000))
            results.append(row(name, ev, rule="default: top-4", min_candidates=1000))
            for m in (*shares[1:], 1000):
                ev = evaluate_corpus(corpus, settings, probability_rule(corpus, 4, m))
                results.append(row(name, ev, rule="distinct, top-4", min_candidates=m))
            for mass in (0.8, 0.9, 0.95, 0.99):
                ev = evaluate_corpus(corpus, replace(settings, min_candidates=0),
                                     mass_rule(corpus, mass, 0))  # fmt: skip
                results.append(row(name, ev, rule=f"mass {mass}, top-4 storage", min_candidates=0))
    return results


def large_grid(name: str, corpora: dict[int, Corpus], features: str) -> list[dict]:
    """Gating rules on a large database (corpora: one per storage top-k)."""
    results = []
    plans: list[tuple[int, str, int]] = [(4, "top-4", 1000)] + [
        (k, f"top-{k}", m) for k in (1, 4, 10) for m in (0, 5000)
    ] + [(1, "top-1", 1000), (10, "top-10", 1000), (1, "centroids", 1000), (4, "centroids", 1000),
         (4, "centroids", 5000), (4, "mass 0.9", 1000), (4, "mass 0.95", 1000),
         (4, "distinct", 1000), (4, "distinct", 5000)]  # fmt: skip
    chosen = SearchSettings(centre=False, query_expansion=3 if features == FEATURES[1] else 0)
    for k, rule, m in plans:
        corpus = corpora[k]
        settings = replace(chosen, top_k=k, min_candidates=m)
        choose = probability_rule(corpus, k, m)
        if rule == "centroids":
            choose = centroid_rule(corpus, m)
        elif rule.startswith("mass"):
            choose = mass_rule(corpus, float(rule.split()[1]), m)
        elif rule == "distinct":
            choose = probability_rule(corpus, k, m)
        ev = evaluate_corpus(corpus, settings, choose)
        label = rule if rule.startswith("top") else f"{rule}, top-{k} storage"
        results.append(row(name, ev, rule=label, min_candidates=m, features=features))
        print(f"{name} {features} {label} min {m}: {ev.map_ratio:.3f}", file=sys.stderr)
    return results


FEATURES = ("gap", "gem+pca+qe3")  # compared on the large databases (PCA learned once)


# -- tables ------------------------------------------------------------------------------------


def markdown_features(results: list[dict]) -> str:
    lines = [
        "| dataset | pooling | PCA | QE | mAP | P@1 | P@10 | top-4 gate: mAP | gating recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e, g = r["exhaustive"], r["gated"]
        lines.append(
            f"| {r['dataset']} | {r['pooling']} | {r['projection']} | {r['qe']} | "
            f"{e['map']:.3f} | {e['p_at_1']:.3f} | {e['p_at_10']:.3f} | {g['map']:.3f} | "
            f"{100 * r['top10_kept']:.1f} % |"
        )
    return "\n".join(lines)


def markdown_gating(results: list[dict]) -> str:
    lines = [
        "| dataset | features | rule | min candidates | gated mAP | % of exhaustive | P@10 | "
        "gating recall | no relevant searched | rows searched |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        g = r["gated"]
        lines.append(
            f"| {r['dataset']} | {r.get('features', 'gap')} | {r['rule']} | "
            f"{r['min_candidates']} | {g['map']:.3f} | {100 * r['map_ratio']:.1f} % | "
            f"{g['p_at_10']:.3f} | {100 * r['top10_kept']:.1f} % | "
            f"{100 * g['no_relevant']:.1f} % | {g['rows_searched']:.0f} "
            f"({100 * g['rows_share']:.1f} %) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaldata", type=Path, default=SHARED / "evaldata")
    parser.add_argument("--testdata", type=Path, default=SHARED / "testdata")
    parser.add_argument("--fashion", type=Path, help="exported Fashion-MNIST folder (small)")
    parser.add_argument("--large", type=Path, help="exported Fashion-MNIST folder: a large DB")
    parser.add_argument("--large-queries", type=int, default=300, help="queries in the large DB")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-quality-grid"))
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--write-groups", type=Path, help="write the near-duplicate groups CSV")
    args = parser.parse_args()

    near = near_duplicate_labels(args.testdata)
    if args.write_groups:
        write_groups(near, args.write_groups)
        print(f"wrote {len(near)} rows to {args.write_groups}", file=sys.stderr)
        return
    sets: dict[str, dict[str, str | None]] = {
        "evaldata": labels_from_folders(args.evaldata),
        "near-duplicates": near,
    }
    if args.fashion:
        sets["fashion-mnist 1k"] = labels_from_folders(args.fashion)
    described = {name: describe(sorted(labels), args.cache / f"{name.split()[0]}.npz")
                 for name, labels in sets.items()}  # fmt: skip
    label_lists = {name: [sets[name][p] for p in described[name].paths] for name in sets}
    results: dict[str, list[dict]] = {"features": [], "gating": [], "large": []}
    for name in sets:
        results["features"] += feature_grid(name, described[name], label_lists[name])
        results["gating"] += gating_grid(name, described[name], label_lists[name])
    if args.large:
        results["large"] = large_db(args, described["evaldata"], label_lists["evaldata"])
    print("## Features (exhaustive search; the top-4 gate is the original one, no widening)\n")
    print(markdown_features(results["features"]))
    print("\n## Gating on the small sets (GAP, no PCA, no QE)\n")
    print(markdown_gating(results["gating"]))
    if results["large"]:
        print("\n## Gating on a large database\n")
        print(markdown_gating(results["large"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def large_db(
    args: argparse.Namespace, evaldata: Described, evaldata_labels: list[str | None]
) -> list[dict]:
    """Two large databases: Fashion-MNIST (labelled; every len/`--large-queries`-th image a
    query) and evaldata plus all of it as distractors (the evaldata images are the queries)."""
    labels = labels_from_folders(args.large)
    fashion = describe(sorted(labels), args.cache / "large.npz")
    fashion_labels = [labels[p] for p in fashion.paths]
    step = max(1, len(fashion_labels) // args.large_queries)
    queries = np.arange(0, len(fashion_labels), step, dtype=np.int64)[: args.large_queries]
    mixed = Described(
        evaldata.paths + fashion.paths,
        np.concatenate([evaldata.probs, fashion.probs]),
        np.concatenate([evaldata.gap, fashion.gap]),
        np.concatenate([evaldata.gem, fashion.gem]),
    )
    mixed_labels = evaldata_labels + [None] * len(fashion_labels)
    mixed_name = f"evaldata + {len(fashion_labels)} fashion"
    results = []
    for name, data, data_labels, rows in (
        (mixed_name, mixed, mixed_labels, None),
        (f"fashion-mnist {len(fashion_labels) // 1000}k", fashion, fashion_labels, queries),
    ):
        projected = project(data)
        for features, pooled in zip(FEATURES, (data, projected), strict=True):
            pooling = features[:3]
            corpora = {k: make_corpus(pooled, data_labels, pooling, k, rows) for k in (1, 4, 10)}
            results += large_grid(name, corpora, features)
        if name == mixed_name:
            results += large_features(name, data, projected, data_labels)
    return results


def project(data: Described) -> Described:
    """Both poolings projected onto their PCA (power 0: centred), learned on all rows once."""
    gap, gem = (apply_whitening(learn_whitening(x, power=0.0), x) for x in (data.gap, data.gem))
    return replace(data, gap=gap, gem=gem)


def large_features(
    name: str, data: Described, projected: Described, labels: list[str | None]
) -> list[dict]:
    """pooling x PCA x QE on a large database, with the default gate and the centroid gate."""
    results = []
    for pca, source in (("none", data), ("pca", projected)):
        for pooling in ("gap", "gem"):
            corpus = make_corpus(source, labels, pooling, 4)
            for qe in (0, 3):
                features = f"{pooling}, {pca}, QE {qe}"
                settings = SearchSettings(centre=False, query_expansion=qe)
                for rule, choose in (("top-4", probability_rule(corpus, 4, 1000)),
                                     ("centroids", centroid_rule(corpus, 1000))):  # fmt: skip
                    ev = evaluate_corpus(corpus, settings, choose)
                    label = rule if rule == "top-4" else f"{rule}, top-4 storage"
                    results.append(row(name, ev, rule=label, min_candidates=1000,
                                       features=features))  # fmt: skip
                    print(f"{name} {features} {label}: {ev.exhaustive.map:.3f}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
