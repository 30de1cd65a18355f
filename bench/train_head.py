"""What `cbir train`'s query head buys, and what it costs on classes it never saw: the table in
docs/quality.md, and the measurement behind cbir.model.HEAD_ANCHOR.

The head is trained with the product's own cbir.model.train_query_head (Keras, supervised
contrastive, on frozen EfficientNet-Lite0 GAP features centred on the searched set's mean,
with its rows as background as cbir.training takes them), then every set is scored
exhaustively with the ranking `cbir query` uses (bench/simulation.py's evaluate_corpus: centred on
the set's mean, query expansion 3), without and with the head:

- evaldata split per class into halves: trained on one half, the other half queried among
  itself, and among the 70,000 Fashion-MNIST images;
- classes never seen in training (trained on all of evaldata): the near-duplicates and
  Fashion-MNIST 1k, where the loss must stay <= 0.01 mAP;
- Fashion-MNIST: trained on 10,000 train-split images, 1,000 test-split images queried among
  themselves.

Each anchor (the weight of ||A - I||^2) and background ratio (database images per labelled
image) is one row per set. Features come from bench/quality_grid.py's cache (run it, or
bench/quality_scale.py, first):

    python bench/train_head.py --large /tmp/fm70k --fashion /tmp/fm1k \
        [--anchors 0.003 0.01 0.03] [--backgrounds 0 1 4]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_grid import SHARED, describe, near_duplicate_labels  # noqa: E402
from simulation import Corpus, SearchSettings, evaluate_corpus  # noqa: E402

from cbir.evaluate import labels_from_folders  # noqa: E402
from cbir.features import normalise  # noqa: E402
from cbir.model import HEAD_ANCHOR, head_epochs, train_query_head  # noqa: E402
from cbir.training import BACKGROUND_PER_IMAGE, MAX_BACKGROUND  # noqa: E402


def train(
    features: npt.NDArray[np.float32], labels: list[str], database: npt.NDArray[np.float32],
    anchor: float, background_per_image: float = BACKGROUND_PER_IMAGE, seed: int = 0,
) -> tuple[npt.NDArray[np.float32], list[float]]:
    """(head (d, d), loss per epoch), as `cbir train` trains it: centred on the mean of the
    `database` (n, d) it will search, with `background_per_image` of its rows per labelled
    image as background."""
    classes = {c: i for i, c in enumerate(sorted(set(labels)))}
    rng = np.random.default_rng(seed)
    n_background = min(len(database), int(background_per_image * len(labels)), MAX_BACKGROUND)
    background = database[np.sort(rng.choice(len(database), n_background, replace=False))]
    y = np.array([classes[c] for c in labels] + [-1] * n_background, np.int64)
    mean = database.astype(np.float64).mean(axis=0).astype(np.float32)
    centred = normalise(np.concatenate([features, background]) - mean)
    return train_query_head(centred, y, head_epochs(len(y)), anchor=anchor, seed=seed)


def exhaustive_map(
    features: npt.NDArray[np.float32], labels: list[str | None],
    head: npt.NDArray[np.float32] | None = None,
) -> float:
    queries = np.array([i for i, label in enumerate(labels) if label is not None], np.int64)
    corpus = Corpus(list(labels), features, [("",)] * len(labels), queries, features[queries],
                    np.zeros((len(queries), 1000), np.float32))  # fmt: skip
    return evaluate_corpus(corpus, SearchSettings(), head=head).exhaustive.map


def row(name: str, setting: str, plain: float, trained: float, loss: list[float],
        seconds: float) -> str:  # fmt: skip
    return (f"| {name} | {setting} | {plain:.3f} | {trained:.3f} | {trained - plain:+.3f} | "
            f"{loss[0]:.2f} -> {loss[-1]:.2f} ({len(loss)} epochs) | {seconds:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=Path, required=True, help="exported Fashion-MNIST 70k")
    parser.add_argument("--fashion", type=Path, required=True, help="exported Fashion-MNIST 1k")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-quality-grid"))
    parser.add_argument("--anchors", type=float, nargs="+", default=[HEAD_ANCHOR])
    parser.add_argument("--backgrounds", type=float, nargs="+", default=[BACKGROUND_PER_IMAGE],
                        help="database images per labelled image taken as background")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    lines = ["| trained on -> scored on | anchor, background | plain mAP | with head | change "
             "| loss | training |", "|---|---|---|---|---|---|---|"]  # fmt: skip

    def say(line: str) -> None:
        lines.append(line)
        print(line, file=sys.stderr, flush=True)

    eval_labels = labels_from_folders(SHARED / "evaldata")
    evaldata = describe(sorted(eval_labels), args.cache / "evaldata.npz")
    labels = [eval_labels[p] for p in evaldata.paths]
    half = np.zeros(len(labels), bool)
    for label in sorted(set(labels)):
        rows = [i for i, x in enumerate(labels) if x == label]
        half[rng.permutation(rows)[: len(rows) // 2]] = True
    test_labels = [labels[i] for i in np.flatnonzero(~half)]
    near = near_duplicate_labels(SHARED / "testdata")
    small = labels_from_folders(args.fashion)
    unseen = []
    for name, set_labels, cache in (("near-duplicates", near, "near-duplicates"),
                                    ("Fashion-MNIST 1k", small, "fashion")):  # fmt: skip
        data = describe(sorted(set_labels), args.cache / f"{cache}.npz")
        unseen.append((name, data.gap, [set_labels[x] for x in data.paths]))
    large = labels_from_folders(args.large)
    fashion = describe(sorted(large), args.cache / "large.npz")
    splits = np.array(["/train_" in x for x in fashion.paths])
    train_rows = rng.choice(np.flatnonzero(splits), 10_000, replace=False)
    test_rows = rng.choice(np.flatnonzero(~splits), 1_000, replace=False)
    fashion_test = [large[fashion.paths[i]] for i in test_rows]

    among = np.concatenate([evaldata.gap[~half], fashion.gap])  # half B among the 70k
    among_labels = test_labels + [None] * len(fashion.gap)
    for anchor, ratio in itertools.product(args.anchors, args.backgrounds):
        setting = f"{anchor:g}, {ratio:g}"
        started = time.perf_counter()
        half_a = [labels[i] for i in np.flatnonzero(half)]
        head, loss = train(evaldata.gap[half], half_a, evaldata.gap[~half], anchor, ratio)
        say(row("evaldata half A -> half B", setting, exhaustive_map(evaldata.gap[~half],
                                                                     test_labels),
                exhaustive_map(evaldata.gap[~half], test_labels, head), loss,
                time.perf_counter() - started))  # fmt: skip
        started = time.perf_counter()
        head, loss = train(evaldata.gap[half], half_a, among, anchor, ratio)
        say(row("evaldata half A -> half B among 70k Fashion-MNIST", setting,
                exhaustive_map(among, among_labels), exhaustive_map(among, among_labels, head),
                loss, time.perf_counter() - started))  # fmt: skip
        for name, features, set_labels in unseen:
            started = time.perf_counter()
            head, loss = train(evaldata.gap, labels, features, anchor, ratio)
            say(row(f"evaldata -> {name} (unseen classes)", setting,
                    exhaustive_map(features, set_labels),
                    exhaustive_map(features, set_labels, head), loss,
                    time.perf_counter() - started))  # fmt: skip
        started = time.perf_counter()
        head, loss = train(fashion.gap[train_rows], [large[fashion.paths[i]] for i in train_rows],
                           fashion.gap[test_rows], anchor, ratio)  # fmt: skip
        say(row("Fashion-MNIST train 10k -> test 1k", setting,
                exhaustive_map(fashion.gap[test_rows], fashion_test),
                exhaustive_map(fashion.gap[test_rows], fashion_test, head), loss,
                time.perf_counter() - started))  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
