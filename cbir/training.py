"""cbir train: learn a query head from the user's labelled images; --reset removes it.

The head is a linear map of the centred query (cbir.centring), learned in Keras with a
supervised contrastive loss (cbir.model.train_query_head) on the frozen backbone's features.
A labelled image the database holds (same content, by SHA-256) brings its stored feature: no
image is decoded again. Others are decoded and described with the database's model. The
stored rows are never rewritten, so images added after training are searched with the head
at once, and --reset gives back exactly the plain ranking.

The database's other images join the training as background (see BACKGROUND_PER_IMAGE): a
query learns to rank its class above the library, not only above the other labelled classes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cbir import __version__
from cbir.centring import centred
from cbir.db import Database, open_writer
from cbir.errors import BadImage, CbirError
from cbir.hashing import file_sha256, image_id_of

DESCRIBE_BATCH = 32  # labelled images the database lacks, described at once
# The database's own (unlabelled) images join the training as background, BACKGROUND_PER_IMAGE
# per labelled image (at most MAX_BACKGROUND): what a query must rank its class above.
# bench/train_head.py --backgrounds 0 0.5 1 2 4 (one run): a head learned on evaldata half A
# and used among the 70k Fashion-MNIST images took half B from 0.591 to 0.287 / 0.623 / 0.655 /
# 0.658 / 0.678; on a database of half B alone (every background image of the labelled
# classes) 0.743 / 0.724 / 0.723 / 0.720 / 0.720; unseen Fashion-MNIST 1k -0.006 or -0.007
# at every ratio; Fashion-MNIST train 10k -> test 1k 0.755 without, 0.751 with.
BACKGROUND_PER_IMAGE = 4
MAX_BACKGROUND = 40_000
MAX_EPOCHS = 1000
CHECK_QUERIES = 300  # held-out images queried per group by the check (a sample beyond that)


@dataclass(frozen=True)
class TrainOptions:
    epochs: int | None = None  # None: about cbir.model.HEAD_STEPS steps
    backbone: str | None = None  # of the model for images the database lacks (its own)
    weights: str | None = None
    engine: str = "auto"
    precision: str = "auto"
    seed: int = 0
    check: bool = True  # first train on part of the labels and score the rest (HeldOut)


@dataclass(frozen=True)
class HeldOut:
    """What a head trained on part of the labels did to the rest, before the real training:
    on classes it saw (held-out images of them) and on classes left out of that training,
    exhaustive mAP among the held-out images, centred on the database's mean as queries are."""

    seen_before: float
    seen_after: float
    unseen_before: float
    unseen_after: float
    n_seen: int  # held-out images of the trained classes
    n_unseen: int  # images of the classes left out


@dataclass(frozen=True)
class TrainReport:
    n_images: int  # labelled images trained on
    n_classes: int
    from_database: int  # of them, with the database's stored feature
    described: int  # decoded and described with the model
    background: int  # the database's other images trained on as background
    epochs: int
    loss: list[float]  # per epoch
    seconds: float
    bad: list[BadImage] = field(default_factory=list)  # unreadable labelled files, skipped
    check: HeldOut | None = None  # None: not asked for, or too few classes (4 are needed)


def train(
    db_dir: Path, labels: Mapping[str, str | None], source: str, options: TrainOptions,
    on_epoch: Callable[[int, int, float], None] | None = None,
    wait: bool = True, on_wait: Callable[[str], None] | None = None,
) -> TrainReport:
    """Learn a query head from `labels` (absolute path -> class; None: not used) and store
    it in the database at `db_dir` with its provenance (`source`: the folder or CSV named).
    on_epoch(epoch, epochs, loss) after each epoch."""
    from cbir import model as models

    started = time.perf_counter()
    if options.epochs is not None and not 1 <= options.epochs <= MAX_EPOCHS:
        raise CbirError(f"epochs must be between 1 and {MAX_EPOCHS}")
    labelled = sorted(p for p, label in labels.items() if label is not None)
    ids, bad = _content_ids(labelled)
    with Database.open(db_dir) as db:
        with db.catalog.snapshot():  # labelled rows and background of one committed state
            centre = db.centre()
            n_database = db.n_images()
            if centre is None:
                raise CbirError(f"{db_dir} holds {n_database} images: train needs a database "
                                "of at least 3 to centre on (add images first)")  # fmt: skip
            features, rows, missing = _stored_features(db, ids)
            background = _background(db, rows, len(ids), options.seed)
        found = dict.fromkeys(features, True)
        if missing:
            for path, feature in _describe(db, missing, options, bad).items():
                features[path], found[path] = feature, False
    kept = [p for p in labelled if p in found]
    counts: dict[str, int] = {}
    for p in kept:
        counts[str(labels[p])] = counts.get(str(labels[p]), 0) + 1
    classes = sorted(counts)
    if len([c for c in classes if counts[c] >= 2]) < 2:
        raise CbirError("train needs at least 2 classes with 2 or more readable images each "
                        f"(found {len(classes)} classes in {source})")  # fmt: skip
    index = {c: i for i, c in enumerate(classes)}
    labelled_y = np.array([index[str(labels[p])] for p in kept], np.int64)
    plain = np.stack([features[p] for p in kept])
    check = _held_out_check(plain, labelled_y, background, centre.mean, options) \
        if options.check else None  # fmt: skip
    y = np.concatenate([labelled_y, np.full(len(background), -1, np.int64)])
    x = centred(np.concatenate([plain, background]), centre.mean)
    epochs = options.epochs or models.head_epochs(len(y))
    head, loss = models.train_query_head(
        x, y, epochs, None if on_epoch is None else lambda e, v: on_epoch(e, epochs, v),
        options.seed,
    )  # fmt: skip
    if not np.isfinite(head).all():
        raise CbirError("training diverged (the head is not finite); nothing was stored")
    from_database = sum(1 for p in kept if found[p])
    report = TrainReport(len(kept), len(classes), from_database, len(kept) - from_database,
                         len(background), epochs, loss, time.perf_counter() - started,
                         bad, check)  # fmt: skip
    provenance = {
        "source": source, "images": report.n_images, "classes": report.n_classes,
        "from_database": report.from_database, "described": report.described,
        "background": len(background),
        "database_images": n_database, "epochs": epochs, "loss_first": loss[0],
        "loss_last": loss[-1], "temperature": models.HEAD_TEMPERATURE,
        "anchor": models.HEAD_ANCHOR, "seed": options.seed, "cbir": __version__,
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "check": None if check is None else asdict(check),
    }  # fmt: skip
    with open_writer(db_dir, wait=wait, on_wait=on_wait) as writer:
        writer.set_query_head(head, provenance)
    return report


def _held_out_check(
    features: npt.NDArray[np.float32], classes: npt.NDArray[np.int64],
    background: npt.NDArray[np.float32], mean: npt.NDArray[np.float32], options: TrainOptions,
) -> HeldOut | None:
    """Train on half the images of half the classes (of those with 2 or more images; a
    trained class needs 4 to hold some out), then
    score the other images: those of the trained classes and those of the classes left out.
    features: (n, d) unit-norm; classes: (n,); background: (b, d). None with fewer than 4
    classes of 2 or more images, or when no trained class has the 4 it takes to hold some
    out."""
    from cbir import model as models

    rng = np.random.default_rng(options.seed)
    sizes = np.bincount(classes)
    eligible = np.flatnonzero(sizes >= 2)
    if len(eligible) < 4:
        return None
    left_out = set(rng.permutation(eligible)[: len(eligible) // 2].tolist())
    train_rows, seen_rows = [], []
    for c in np.unique(classes).tolist():
        rows = rng.permutation(np.flatnonzero(classes == c))
        if c in left_out:
            continue
        cut = len(rows) // 2 if len(rows) >= 4 else len(rows)  # small classes: training only
        train_rows += rows[:cut].tolist()
        seen_rows += rows[cut:].tolist()
    unseen_rows = np.flatnonzero(np.isin(classes, sorted(left_out))).tolist()
    if not seen_rows:  # every trained class too small to hold images out
        return None
    train = np.array(train_rows, np.int64)
    x = centred(np.concatenate([features[train], background]), mean)
    y = np.concatenate([classes[train], np.full(len(background), -1, np.int64)])
    head, _ = models.train_query_head(x, y, options.epochs or models.head_epochs(len(y)),
                                      seed=options.seed)  # fmt: skip
    if not np.isfinite(head).all():
        return None  # diverged: no number to show
    scored = np.array(seen_rows + unseen_rows, np.int64)
    seen = np.arange(len(seen_rows))
    unseen = np.arange(len(seen_rows), len(scored))

    def score(queries: npt.NDArray[np.int64], h: npt.NDArray[np.float32] | None) -> float:
        return _map(features[scored], classes[scored], queries, mean, h)

    return HeldOut(score(seen, None), score(seen, head), score(unseen, None),
                   score(unseen, head), len(seen), len(unseen))  # fmt: skip


def _map(
    features: npt.NDArray[np.float32], classes: npt.NDArray[np.int64],
    queries: npt.NDArray[np.int64], mean: npt.NDArray[np.float32],
    head: npt.NDArray[np.float32] | None,
) -> float:
    """Exhaustive mAP of (up to CHECK_QUERIES of) `queries` among `features` (m, d), each
    query left out, ranked as `cbir query` ranks (centred, query expansion, the head)."""
    from cbir.evaluate import average_precision
    from cbir.ranking import Float16Rows, rank
    from cbir.search import DEFAULT_QUERY_EXPANSION

    if len(queries) > CHECK_QUERIES:
        queries = np.sort(np.random.default_rng(0).choice(queries, CHECK_QUERIES, replace=False))
    rows = Float16Rows.of(features)
    aps = []
    for q in queries.tolist():
        others = np.flatnonzero(np.arange(len(features)) != q)
        relevant = classes == classes[q]
        relevant[q] = False
        if not relevant.any():
            continue
        ranked = rank(rows, features[q], len(others), DEFAULT_QUERY_EXPANSION, others, mean,
                      head)  # fmt: skip
        aps.append(average_precision(relevant[ranked.positions], int(relevant.sum())))
    return float(np.mean(aps)) if aps else float("nan")


def reset(db_dir: Path, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> bool:
    """Remove the query head (queries are plain centred ones again); False if there was none."""
    with open_writer(db_dir, wait=wait, on_wait=on_wait) as writer:
        had = writer.catalog.has_query_head()  # a damaged one is removed too
        if had:
            writer.set_query_head(None, {})
    return had


def _content_ids(paths: list[str]) -> tuple[dict[str, int], list[BadImage]]:
    """(path -> the id its content has in any database (cbir.hashing), unreadable files)."""
    ids: dict[str, int] = {}
    bad: list[BadImage] = []
    for path in paths:
        try:
            ids[path] = image_id_of(file_sha256(Path(path)))
        except OSError as exc:
            bad.append(BadImage(Path(path), f"cannot read ({exc.strerror})"))
    return ids, bad


def _stored_features(
    db: Database, ids: dict[str, int]
) -> tuple[dict[str, npt.NDArray[np.float32]], set[int], list[str]]:
    """(path -> unit-norm stored feature (d,) of the labelled images the database holds,
    their matrix rows, the paths it lacks). Call inside a catalog snapshot."""
    rows: dict[str, int] = {}
    missing: list[str] = []
    for path, image_id in ids.items():
        record = db.image(image_id)
        if record is not None:
            rows[path] = record.row
        else:
            missing.append(path)
    features: dict[str, npt.NDArray[np.float32]] = {}
    if rows:
        stored = db.matrix().gather(np.array(list(rows.values()), np.int64))
        for path, feature in zip(rows, stored, strict=True):
            features[path] = feature / max(float(np.linalg.norm(feature)), 1e-12)
    return features, set(rows.values()), missing


def _background(
    db: Database, labelled_rows: set[int], n_labelled: int, seed: int
) -> npt.NDArray[np.float32]:
    """(b, d) stored features of up to BACKGROUND_PER_IMAGE * n_labelled of the database's
    images that are not labelled, chosen at random. Call inside a catalog snapshot."""
    _, rows = db.catalog.all_rows()
    rows = rows[~np.isin(rows, np.array(sorted(labelled_rows), np.int64))]
    n = min(len(rows), BACKGROUND_PER_IMAGE * n_labelled, MAX_BACKGROUND)
    chosen = np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))
    return db.matrix().gather(chosen)


def _describe(
    db: Database, paths: list[str], options: TrainOptions, bad: list[BadImage]
) -> dict[str, npt.NDArray[np.float32]]:
    """Features (d,) of labelled images the database does not hold, with its own model."""
    from cbir.images import load_image
    from cbir.query import open_model

    model = open_model(db, options.backbone, options.weights, options.engine, options.precision)
    size = model.backbone.input_size
    features: dict[str, npt.NDArray[np.float32]] = {}
    for start in range(0, len(paths), DESCRIBE_BATCH):
        batch: list[tuple[str, npt.NDArray[np.uint8]]] = []
        for path in paths[start : start + DESCRIBE_BATCH]:
            try:
                batch.append((path, load_image(Path(path), size, resize=db.settings.resize)))
            except BadImage as exc:
                bad.append(exc)
        if not batch:
            continue
        described = model.describe(np.stack([pixels for _, pixels in batch]))
        for (path, _), feature in zip(batch, described.features[db.settings.pooling],
                                      strict=True):  # fmt: skip
            features[path] = np.asarray(feature, np.float32)
    return features
