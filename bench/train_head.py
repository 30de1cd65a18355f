"""What a learned projection of the stored features would buy: the measurement behind the design
of `cbir train` (issue 16, part 2), which is not in the product yet.

A linear head (d -> d, initialised to the identity, outputs L2-normalised) is trained in Keras
on frozen EfficientNet-Lite0 GAP features with a supervised-contrastive loss and a pull towards
the identity (ANCHOR), then every set is
scored exhaustively with the ranking `cbir query` uses (cbir.evaluate.evaluate_corpus: centred
on the database mean, query expansion 3), plain features against projected ones:

- evaldata split per class into halves: trained on one half, the other half queried among itself;
- classes never seen in training (trained on all of evaldata): the near-duplicates and
  Fashion-MNIST 1k, where the loss must stay <= 0.01 mAP;
- Fashion-MNIST: trained on 10,000 train-split images, 1,000 test-split images queried among
  themselves.

Features come from bench/quality_grid.py's cache (run it, or bench/quality_scale.py, first):

    python bench/train_head.py --large /tmp/fm70k --fashion /tmp/fm1k
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_grid import SHARED, describe, near_duplicate_labels  # noqa: E402

from cbir.evaluate import Corpus, SearchSettings, evaluate_corpus, labels_from_folders  # noqa: E402
from cbir.features import normalise  # noqa: E402

EPOCHS = 30
BATCH = 128
TEMPERATURE = 0.1
# Weight of ||W - I||^2 in the loss: keeps the head near the plain features, so classes never
# seen in training lose little. One run (2 cores): 0 / 0.001 / 0.01 / 0.1 gave evaldata halves
# +0.146 / +0.148 / +0.104 / +0.088 mAP, unseen Fashion-MNIST 1k -0.049 / -0.023 / -0.006 /
# -0.003, Fashion-MNIST train -> test +0.221 / +0.212 / +0.149 / +0.061.
ANCHOR = 0.01


def train_head(
    features: npt.NDArray[np.float32], labels: list[str], epochs: int = EPOCHS,
    anchor: float = ANCHOR, seed: int = 0,
) -> tuple[npt.NDArray[np.float32], list[float]]:
    """(projection (d, d), loss per epoch) of a linear head trained with a supervised
    contrastive loss (Khosla et al. 2020) on (n, d) unit-norm features, plus
    anchor * ||W - I||^2."""
    import keras
    from keras import ops

    class TowardsIdentity(keras.regularizers.Regularizer):
        def __call__(self, w):  # noqa: ANN001, ANN204
            return anchor * ops.sum(ops.square(w - ops.eye(ops.shape(w)[0])))

    keras.utils.set_random_seed(seed)
    classes = {c: i for i, c in enumerate(sorted(set(labels)))}
    y = np.array([classes[c] for c in labels], np.int32)
    d = features.shape[1]
    dense = keras.layers.Dense(d, use_bias=False, kernel_initializer="identity",
                               kernel_regularizer=TowardsIdentity())  # fmt: skip
    model = keras.Sequential([keras.Input((d,)), dense])

    def supcon(y_true, z):  # noqa: ANN001, ANN202
        z = z / ops.maximum(ops.norm(z, axis=1, keepdims=True), 1e-12)
        logits = ops.matmul(z, ops.transpose(z)) / TEMPERATURE
        n = ops.shape(z)[0]
        not_self = 1.0 - ops.eye(n)
        labels_ = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        same = ops.cast(ops.equal(labels_[:, None], labels_[None, :]), "float32") * not_self
        logits = logits - 1e9 * (1.0 - not_self)
        log_prob = logits - ops.logsumexp(logits, axis=1, keepdims=True)
        positives = ops.maximum(ops.sum(same, axis=1), 1.0)
        return -ops.mean(ops.sum(same * log_prob, axis=1) / positives)

    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=supcon)
    history = model.fit(features, y, batch_size=BATCH, epochs=epochs, shuffle=True, verbose=0)
    return dense.get_weights()[0].T.astype(np.float32), [float(x) for x in history.history["loss"]]


def project(projection: npt.NDArray[np.float32], x: npt.NDArray[np.float32]) -> np.ndarray:
    return normalise(x @ projection.T)


def exhaustive_map(features: npt.NDArray[np.float32], labels: list[str | None]) -> float:
    queries = np.array([i for i, label in enumerate(labels) if label is not None], np.int64)
    corpus = Corpus(list(labels), features, [("",)] * len(labels), queries, features[queries],
                    np.zeros((len(queries), 1000), np.float32))  # fmt: skip
    return evaluate_corpus(corpus, SearchSettings()).exhaustive.map


def row(name: str, plain: float, trained: float, loss: list[float], seconds: float) -> str:
    return (f"| {name} | {plain:.3f} | {trained:.3f} | {trained - plain:+.3f} | "
            f"{loss[0]:.2f} -> {loss[-1]:.2f} | {seconds:.0f} s |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=Path, required=True, help="exported Fashion-MNIST 70k")
    parser.add_argument("--fashion", type=Path, required=True, help="exported Fashion-MNIST 1k")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-quality-grid"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    lines = ["| trained on -> scored on | plain mAP | trained mAP | change | loss | training |",
             "|---|---|---|---|---|---|"]  # fmt: skip

    eval_labels = labels_from_folders(SHARED / "evaldata")
    evaldata = describe(sorted(eval_labels), args.cache / "evaldata.npz")
    labels = [eval_labels[p] for p in evaldata.paths]
    half = np.zeros(len(labels), bool)
    for label in sorted(set(labels)):
        rows = [i for i, x in enumerate(labels) if x == label]
        half[rng.permutation(rows)[: len(rows) // 2]] = True
    started = time.perf_counter()
    p, loss = train_head(evaldata.gap[half], [labels[i] for i in np.flatnonzero(half)])
    test = ~half
    test_labels = [labels[i] for i in np.flatnonzero(test)]
    lines.append(row("evaldata half A -> half B", exhaustive_map(evaldata.gap[test], test_labels),
                     exhaustive_map(project(p, evaldata.gap[test]), test_labels), loss,
                     time.perf_counter() - started))  # fmt: skip
    print(lines[-1], file=sys.stderr)

    started = time.perf_counter()
    p, loss = train_head(evaldata.gap, labels)
    seconds = time.perf_counter() - started
    near = near_duplicate_labels(SHARED / "testdata")
    small = labels_from_folders(args.fashion)
    for name, set_labels, cache in (("near-duplicates", near, "near-duplicates"),
                                    ("Fashion-MNIST 1k", small, "fashion")):  # fmt: skip
        data = describe(sorted(set_labels), args.cache / f"{cache}.npz")
        row_labels = [set_labels[x] for x in data.paths]
        lines.append(row(f"evaldata -> {name} (unseen classes)",
                         exhaustive_map(data.gap, row_labels),
                         exhaustive_map(project(p, data.gap), row_labels), loss, seconds))
        print(lines[-1], file=sys.stderr)

    large = labels_from_folders(args.large)
    fashion = describe(sorted(large), args.cache / "large.npz")
    splits = np.array(["/train_" in x for x in fashion.paths])
    train = rng.choice(np.flatnonzero(splits), 10_000, replace=False)
    test_rows = rng.choice(np.flatnonzero(~splits), 1_000, replace=False)
    started = time.perf_counter()
    p, loss = train_head(fashion.gap[train], [large[fashion.paths[i]] for i in train], epochs=10)
    test_labels = [large[fashion.paths[i]] for i in test_rows]
    lines.append(row("Fashion-MNIST train 10k -> test 1k",
                     exhaustive_map(fashion.gap[test_rows], test_labels),
                     exhaustive_map(project(p, fashion.gap[test_rows]), test_labels), loss,
                     time.perf_counter() - started))  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
