"""Command line: parse arguments, call the library, print results, choose the exit code.

Heavy modules (TensorFlow, OpenVINO, matplotlib) are imported only by the commands that need
them, so `cbir --help` and `cbir info` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cbir import __version__
from cbir.errors import BadImage, CbirError

EXIT_SKIPPED = 3  # --strict and some files were skipped
PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".eps", ".ps")


class UsageError(CbirError):
    """A command line that does not parse (exit status 1, like every user's mistake)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where to read more."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see '{self.prog} --help'")


def main(argv: list[str] | None = None) -> int:
    _run_state["committed"] = 0
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except CbirError as exc:
        _clear_progress()
        print(f"cbir: error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # the machine's: a full disk, a read-only folder, permissions
        _clear_progress()
        where = f" writing {shown(exc.filename)}" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            print(f"cbir: error: no space left on the device{where}; free space and run the same "
                  "command again (what was committed is intact)", file=sys.stderr)  # fmt: skip
        else:
            print(f"cbir: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _clear_progress(close=True)
        committed = _run_state["committed"]
        if committed:
            print(f"cbir: interrupted after committing {committed} images; run the same command "
                  "again to finish", file=sys.stderr)  # fmt: skip
        else:
            print("cbir: interrupted before anything was committed", file=sys.stderr)
        return 130


_run_state = {"committed": 0}  # what the interrupted command had committed


def shown(path: object) -> str:
    """A path as text that prints anywhere and stays on one line: bytes that are not UTF-8
    as \\xNN, control characters (a newline in a file name) escaped."""
    text = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
    return one_line(text)


def one_line(text: str) -> str:
    """`text` with control characters escaped (\\n, \\t, \\x1b), surrogates as \\xNN."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def finite_float(text: str) -> float:
    """A number option: 'nan' or 'inf' would switch a limit off or match nothing, silently."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    from cbir.db import LINK_MODES
    from cbir.images import DEFAULT_MAX_MEGAPIXELS
    from cbir.indexing import COMMIT_EVERY_IMAGES, DEFAULT_BATCH_SIZE
    from cbir.model import BACKBONES, DEFAULT_BACKBONE, ENGINES, POOLINGS, PRECISIONS
    from cbir.search import DEFAULT_MIN_CANDIDATES, DEFAULT_QUERY_EXPANSION

    parser = Parser(prog="cbir", description="Content-based image retrieval with ImageNet CNNs.")
    parser.add_argument("--version", action="version", version=f"cbir {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def engine_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--engine",
            choices=ENGINES,
            default="auto",
            help="inference engine (default: the fastest available)",
        )
        p.add_argument(
            "--precision",
            choices=PRECISIONS,
            default="auto",
            help="openvino precision (default: bf16 where the CPU has it)",
        )

    def search_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--min-candidates",
            type=int,
            default=DEFAULT_MIN_CANDIDATES,
            help="widen the searched categories until they hold this many images",
        )
        p.add_argument(
            "--query-expansion",
            type=int,
            default=DEFAULT_QUERY_EXPANSION,
            metavar="M",
            help="re-rank by the query averaged with its top M results (0: off)",
        )

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            choices=list(BACKBONES),
            help=f"backbone (default: the database's, else {DEFAULT_BACKBONE})",
        )
        p.add_argument(
            "--weights",
            help="imagenet (Keras' cache, downloaded if missing), none (random, for "
            "benchmarks), or a weights FILE (default: the database's, else imagenet)",
        )

    def writer_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--no-wait",
            dest="wait",
            action="store_false",
            help="fail at once if another cbir process is writing to the database",
        )

    def index_options(p: argparse.ArgumentParser) -> None:
        model_options(p)
        p.add_argument(
            "--top-k",
            type=int,
            help="categories each image is stored in (default: the database's, else 4)",
        )
        p.add_argument(
            "--link",
            choices=LINK_MODES,
            help=(
                "how images are stored in category folders: copy (one copy, hard-linked into"
                " its other categories), hardlink or symlink to the source (default: the"
                " database's, else copy)"
            ),
        )
        p.add_argument(
            "--pooling",
            choices=POOLINGS,
            help="feature pooling (default: the database's, else gap)",
        )
        p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
        p.add_argument(
            "--max-megapixels",
            type=finite_float,
            default=DEFAULT_MAX_MEGAPIXELS,
            help="larger images are skipped as possible decompression bombs",
        )
        p.add_argument("--strict", action="store_true", help="exit non-zero if any file is skipped")
        p.add_argument(
            "--commit-every",
            type=int,
            default=COMMIT_EVERY_IMAGES,
            metavar="N",
            help="commit to disk every N new images (and at least once a minute)",
        )
        p.add_argument(
            "--ray",
            metavar="ADDRESS",
            help=(
                "decode and describe on Ray actors: 'local' starts Ray on this machine, 'auto'"
                " or HOST:PORT joins a running cluster (needs pip install 'cbir[ray]'; every"
                " node reads the source files at the same paths unless --ray-ship-bytes)"
            ),
        )
        p.add_argument(
            "--ray-ship-bytes",
            action="store_true",
            help="with --ray: send each file's bytes to the actors (nodes without the files)",
        )
        engine_options(p)
        writer_options(p)

    p = commands.add_parser("create-db", help="index a folder of images into a database")
    p.add_argument("source_dir", type=Path)
    p.add_argument("db_dir", type=Path)
    index_options(p)
    p.add_argument(
        "--prune", action="store_true", help="also drop entries whose source file no longer exists"
    )
    p.set_defaults(handler=cmd_create_db)

    p = commands.add_parser("add", help="add files or folders to an existing database")
    p.add_argument("db_dir", type=Path)
    p.add_argument("paths", type=Path, nargs="+")
    index_options(p)
    p.set_defaults(handler=cmd_add)

    p = commands.add_parser("remove", help="drop images (their rows and stored copies)")
    p.add_argument("db_dir", type=Path)
    p.add_argument("paths", type=Path, nargs="+")
    writer_options(p)
    p.set_defaults(handler=cmd_remove)

    p = commands.add_parser("sync", help="drop entries whose source file no longer exists")
    p.add_argument("db_dir", type=Path)
    writer_options(p)
    p.set_defaults(handler=cmd_sync)

    p = commands.add_parser("check", help="verify a database's files; --repair fixes them")
    p.add_argument("db_dir", type=Path)
    p.add_argument("--repair", action="store_true", help="repair what can be repaired")
    writer_options(p)
    p.set_defaults(handler=cmd_check)

    p = commands.add_parser("query", help="find the images most similar to query images")
    p.add_argument("db_dir", type=Path)
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("-n", type=int, default=10, dest="n_results", help="results per query")
    p.add_argument("--min-score", type=finite_float, default=-1.0, metavar="S",
                   help="leave out results whose plain cosine to the query is below S (the "
                   "score they are ranked by is centred on the database's mean, so it moves "
                   "as the database changes; the cosine does not)")
    p.add_argument("--exclude-self", action="store_true",
                   help="leave out the query's own content when the database holds it")
    p.add_argument("--json", action="store_true", help="one JSON object per query per line")
    p.add_argument("--plot", type=Path, metavar="FILE", help="save a figure of the results")
    p.add_argument(
        "--all",
        action="store_true",
        dest="search_all",
        help="search every image, not only the nearest lists or categories (approximate, "
        "through the database's inverted file, once it was trained on 200,000 images)",
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="with --all: compare every image even where an inverted file makes it approximate",
    )
    p.add_argument(
        "--max-megapixels",
        type=finite_float,
        default=DEFAULT_MAX_MEGAPIXELS,
        help="larger query images are refused as possible decompression bombs",
    )
    search_options(p)
    model_options(p)
    engine_options(p)
    p.set_defaults(handler=cmd_query)

    p = commands.add_parser(
        "evaluate",
        help="measure retrieval quality on labelled images (mAP, P@k, gating recall)",
        description="Query every labelled image against the rest (leave-one-out), gated and "
        "exhaustively, and report mAP, precision@1/5/10, recall@10 and what gating costs.",
    )
    p.add_argument("labelled_dir", type=Path, nargs="?", help="one sub-folder of images per class")
    p.add_argument(
        "--groups",
        type=Path,
        metavar="FILE",
        help="CSV of path,group rows instead of class folders (an empty group: a distractor)",
    )
    p.add_argument(
        "--db", type=Path, help="evaluate this database (default: build a temporary one)"
    )
    p.add_argument(
        "--distractors",
        type=Path,
        metavar="DIR",
        help="also index the images under DIR into the temporary database: unlabelled, never "
        "relevant, so that the labelled set is scored inside a large database",
    )
    p.add_argument(
        "--model",
        choices=list(BACKBONES),
        help=f"backbone (default: the database's with --db, else {DEFAULT_BACKBONE})",
    )
    p.add_argument("--weights", help="imagenet (default), none, or a weights FILE")
    p.add_argument(
        "--top-k", type=int, default=4, help="categories per image of the temporary database"
    )
    p.add_argument(
        "--pooling", choices=POOLINGS, default="gap", help="pooling of the temporary database"
    )
    search_options(p)
    p.add_argument(
        "--no-head",
        action="store_true",
        help="with --db: rank without the query head 'cbir train' learned (for comparison)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    engine_options(p)
    p.set_defaults(handler=cmd_evaluate)

    p = commands.add_parser(
        "train",
        help="learn from labelled images how queries should rank (--reset: forget it)",
        description="Learn a query head from labelled images (one sub-folder per class, or "
        "--groups FILE) and store it in the database: query, serve and evaluate --db use it. "
        "Images the database holds bring their stored features; others are described with "
        "the database's model. Stored features are never changed.",
    )
    p.add_argument("db_dir", type=Path)
    p.add_argument("labelled_dir", type=Path, nargs="?", help="one sub-folder of images per class")
    p.add_argument("--groups", type=Path, metavar="FILE", help="CSV of path,group rows instead")
    p.add_argument("--reset", action="store_true", help="remove the head: plain queries again")
    p.add_argument("--epochs", type=int, help="passes over the images (default: about 1000 "
                   "steps of 128, at most 30 passes)")  # fmt: skip
    p.add_argument("--no-check", action="store_true", help="skip the check that first trains "
                   "on part of the labels and scores the rest (it doubles the training time)")
    p.add_argument("--weights", help="weights FILE of a database built with one")
    engine_options(p)
    writer_options(p)
    p.set_defaults(handler=cmd_train)

    p = commands.add_parser("info", help="describe a database")
    p.add_argument("db_dir", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_info)

    p = commands.add_parser("find", help="images of a concept, by WordNet (dog, fruit, vehicle)")
    p.add_argument("db_dir", type=Path)
    p.add_argument("words", nargs="+", help="a class or concept, e.g. cat, dog, musical instrument")
    p.add_argument("-n", type=int, default=20, dest="n_results", help="results")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(handler=cmd_find)

    p = commands.add_parser("map", help="a 2-D picture of the database's feature space")
    p.add_argument("db_dir", type=Path)
    p.add_argument("--plot", type=Path, metavar="FILE", required=True,
                   help="where to save the figure (.png, .jpg, .pdf, .svg)")
    p.add_argument("--method", choices=("auto", "tsne", "pca"), default="auto",
                   help="auto: t-SNE up to 200,000 images, else PCA")
    p.add_argument("--colour", "--color", dest="colour", choices=("category", "folder"),
                   default="category",
                   help="colour points by their top category, or by their source folder (labels)")
    p.add_argument("--thumbnails", type=int, default=30, metavar="N",
                   help="images drawn at their points, spread over the map")
    p.set_defaults(handler=cmd_map)

    p = commands.add_parser("duplicates",
                            help="groups of identical and near-duplicate images")
    p.add_argument("db_dir", type=Path)
    p.add_argument("--threshold", type=finite_float, default=None, metavar="T",
                   help="near-duplicates have a cosine >= T (default: 0.8, measured on the test "
                        "data's near-duplicates; README)")
    p.add_argument("--json", action="store_true", help="one JSON object per group per line")
    p.set_defaults(handler=cmd_duplicates)

    p = commands.add_parser("ls",
                            help="list categories with their counts, or one category's images")
    p.add_argument("db_dir", type=Path)
    p.add_argument("category", nargs="?",
                   help="a category's wnid or name (e.g. n02124075 or Egyptian_cat)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(handler=cmd_ls)

    p = commands.add_parser(
        "serve",
        help="a web page and a JSON API over a database (model loaded once)",
        description="Serve a search page at / and a JSON API under /api (OpenAPI at "
        "/openapi.json). Read-only; serves only images the catalog lists.",
    )
    p.add_argument("db_dir", type=Path)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (default: 8000)")
    p.add_argument("--max-upload-mb", type=finite_float, default=20.0,
                   help="larger query uploads get HTTP 413 (default: 20)")
    p.add_argument("--weights", help="the weights FILE, for a database built with one")
    engine_options(p)
    p.set_defaults(handler=cmd_serve)
    for name, sub in commands.choices.items():
        sub.formatter_class = HelpFormatter
        sub.epilog = "example:\n  " + EXAMPLES[name]
    return parser


EXAMPLES = {
    "create-db": "cbir create-db ~/Pictures pictures.db --model efficientnet_lite0",
    "add": "cbir add pictures.db ~/Pictures/2026/holiday",
    "remove": "cbir remove pictures.db ~/Pictures/2026/blurry.jpg",
    "sync": "cbir sync pictures.db",
    "check": "cbir check pictures.db --repair",
    "query": "cbir query pictures.db cat.jpg -n 5 --min-score 0.3 --plot cat-results.png",
    "evaluate": "cbir evaluate ../shared/evaldata --model efficientnet_lite0",
    "train": "cbir train pictures.db ~/Pictures/labelled   # one sub-folder per class",
    "info": "cbir info pictures.db --json",
    "ls": "cbir ls pictures.db Egyptian_cat",
    "duplicates": "cbir duplicates pictures.db --threshold 0.9 --json",
    "find": "cbir find pictures.db musical instrument -n 10",
    "map": "cbir map pictures.db --plot map.png --colour folder",
    "serve": "cbir serve pictures.db --port 8000",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default shown after its help (where its help does not already say it);
    the example in the epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):  # fmt: skip
            return text
        return text + " (default: %(default)s)"


def _index_options(args: argparse.Namespace):  # noqa: ANN202
    """Options for create-db/add; what is not given is the database's own (cbir.indexing)."""
    from cbir.indexing import IndexOptions

    if args.batch_size < 1:
        raise CbirError("--batch-size must be at least 1")
    if args.commit_every < 1:
        raise CbirError("--commit-every must be at least 1")
    if args.max_megapixels <= 0:
        raise CbirError("--max-megapixels must be more than 0")
    if args.ray_ship_bytes and not args.ray:
        raise CbirError("--ray-ship-bytes needs --ray ADDRESS")
    return IndexOptions(
        backbone=args.model, weights=args.weights, top_k=args.top_k, link=args.link,
        pooling=args.pooling, engine=args.engine, precision=args.precision,
        batch_size=args.batch_size, max_megapixels=args.max_megapixels, wait=args.wait,
        commit_every=args.commit_every, ray=args.ray, ray_ship_bytes=args.ray_ship_bytes,
    )  # fmt: skip


def _index(args: argparse.Namespace, db_dir: Path, sources: list[Path]) -> int:
    from cbir.indexing import Callbacks, index_paths

    def on_skip(bad: BadImage) -> None:
        _clear_progress()
        print(f"skipping {shown(bad.path)}: {one_line(bad.reason)}", file=sys.stderr)

    def on_commit(images: int) -> None:
        _run_state["committed"] = images

    def on_warning(path: Path, message: str) -> None:
        _clear_progress()
        print(f"warning: {shown(path)}: damaged data ({one_line(message)}); indexed as decoded",
              file=sys.stderr)  # fmt: skip

    callbacks = Callbacks(on_skip=on_skip, on_wait=_say, progress=_progress_bar,
                          on_commit=on_commit, on_warning=on_warning)  # fmt: skip
    report = index_paths(db_dir, sources, _index_options(args), callbacks)
    removed = 0
    if getattr(args, "prune", False):
        from cbir.indexing import sync

        pruned = sync(db_dir, wait=args.wait, on_wait=_say)
        _say_unknown(pruned.unknown)
        removed = pruned.images
    summary = (
        f"indexed {report.indexed}, unchanged {report.unchanged}, skipped {len(report.skipped)}"
    )
    if report.new_paths:
        summary += f", known content under a new name {report.new_paths}"
    if report.removed + removed:
        summary += f", removed {report.removed + removed}"
    print(summary, file=sys.stderr)
    if report.cluster is not None:
        print(report.cluster.summary(), file=sys.stderr)
    if args.strict and report.skipped:
        print(f"cbir: error: {len(report.skipped)} file(s) skipped (--strict)", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


def cmd_create_db(args: argparse.Namespace) -> int:
    if args.source_dir.is_file():
        raise CbirError(f"source folder {shown(args.source_dir)} is a file: give a folder (or "
                        "index single files into a database with 'cbir add DB_DIR FILE...')")
    if not args.source_dir.is_dir():
        raise CbirError(f"source folder {shown(args.source_dir)} does not exist")
    return _index(args, args.db_dir, [args.source_dir])


def cmd_add(args: argparse.Namespace) -> int:
    from cbir.db import read_manifest

    read_manifest(args.db_dir)  # adding needs an existing database
    return _index(args, args.db_dir, args.paths)


def cmd_remove(args: argparse.Namespace) -> int:
    from cbir.indexing import remove_sources

    done = remove_sources(args.db_dir, args.paths, wait=args.wait, on_wait=_say)
    for path in done.not_indexed:
        print(f"cbir: {shown(path)} is not in the database (nothing under it is indexed)",
              file=sys.stderr)  # fmt: skip
    print(f"forgot {done.paths} paths, removed {done.images} images (an image stays while "
          "another path has its content)", file=sys.stderr)  # fmt: skip
    return 1 if len(done.not_indexed) == len(args.paths) else 0


def cmd_sync(args: argparse.Namespace) -> int:
    from cbir.indexing import sync

    done = sync(args.db_dir, wait=args.wait, on_wait=_say)
    _say_unknown(done.unknown)
    if not done.paths:
        print("removed 0: no indexed source file is known to be gone", file=sys.stderr)
    else:
        print(f"forgot {done.paths} paths of deleted files, removed {done.images} images",
              file=sys.stderr)  # fmt: skip
    return 0


def _say_unknown(unknown: list[tuple[str, str]]) -> None:
    """One line per source that could not be looked at (kept), then how many."""
    for path, why in unknown[:20]:
        print(f"kept {shown(path)}: cannot tell whether it still exists ({why})",
              file=sys.stderr)  # fmt: skip
    if len(unknown) > 20:
        print(f"kept {len(unknown) - 20} more that cannot be looked at", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    from cbir.db import check_database

    problems = check_database(args.db_dir, repair=args.repair, wait=args.wait, on_wait=_say)
    for line in problems:
        print(one_line(line))
    if not problems:
        print(f"{shown(args.db_dir)}: ok")
        return 0
    if args.repair:
        print(f"{shown(args.db_dir)}: repaired {len(problems)} problem(s)")
        return 0
    print(f"{shown(args.db_dir)}: {len(problems)} problem(s); run 'cbir check --repair'",
          file=sys.stderr)  # fmt: skip
    return 1


def cmd_query(args: argparse.Namespace) -> int:
    from cbir.api import result_json
    from cbir.query import QueryOptions, open_for_query, run_queries

    if args.n_results < 1:
        raise CbirError("-n must be at least 1")
    _check_search_options(args)
    plot = _plot_target(args.plot) if args.plot else None
    images = _query_images(args.images)
    options = QueryOptions(
        n_results=args.n_results, search_all=args.search_all, min_score=args.min_score,
        exclude_self=args.exclude_self,
        min_candidates=args.min_candidates, engine=args.engine, precision=args.precision,
        query_expansion=args.query_expansion, exact=args.exact,
        max_megapixels=args.max_megapixels,
    )  # fmt: skip
    db, model = open_for_query(args.db_dir, options, args.model, args.weights)
    outcomes = run_queries(db, model, images, options)
    results = []
    for outcome in outcomes:
        if isinstance(outcome, BadImage):
            print(f"cbir: error: query {shown(outcome.path)}: {one_line(outcome.reason)}",
                  file=sys.stderr)  # fmt: skip
            continue
        results.append(outcome)
        if args.json:
            print(json.dumps(result_json(outcome, shown), ensure_ascii=False))
        else:
            _print_table(outcome)
    if plot and results:
        from cbir.plotting import MAX_RESULTS, plot_results

        plot_results(results, plot, n_results=args.n_results)
        more = f" (the best {MAX_RESULTS} of each query)" if args.n_results > MAX_RESULTS else ""
        print(f"saved plot {shown(plot)}{more}", file=sys.stderr)
    return 0 if len(results) == len(outcomes) else 1


def _check_search_options(args: argparse.Namespace) -> None:
    if args.min_candidates < 0:
        raise CbirError("--min-candidates must be 0 or more")
    if args.query_expansion < 0:
        raise CbirError("--query-expansion must be 0 (off) or more")
    if getattr(args, "max_megapixels", 1) <= 0:
        raise CbirError("--max-megapixels must be more than 0")


def _query_images(paths: list[Path]) -> list[Path]:
    """The query images: files as given, folders as every image in them (sorted)."""
    from cbir.images import find_images

    images: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = [p for p in find_images([path]) if not isinstance(p, BadImage)]
            if not found:
                raise CbirError(f"query folder {shown(path)} holds no image files")
            images += found
        elif path.is_file():
            images.append(path)
        elif path.exists():
            raise CbirError(f"query image {shown(path)} is not a regular file")
        else:
            raise CbirError(f"query image {shown(path)} does not exist")
    return images


def _plot_target(path: Path) -> Path:
    """Where --plot writes: the file named, or NAME.png for a name without an extension."""
    if path.is_dir():
        raise CbirError(f"--plot {shown(path)} is a folder: give a file name, e.g. results.png")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    if path.suffix.lower() not in PLOT_FORMATS:
        raise CbirError(f"--plot: cannot save a figure as {path.suffix!r}; use one of "
                        f"{', '.join(PLOT_FORMATS)}")  # fmt: skip
    if not path.parent.is_dir():
        raise CbirError(f"--plot: the folder {shown(path.parent)} does not exist")
    return path


def _print_table(result) -> None:  # noqa: ANN001
    from cbir import categories
    from cbir.db import ivf

    names = categories.names_by_wnid()
    cats = ", ".join(f"{c.name} {c.prob:.2f}" for c in result.categories)
    print(f"query {shown(result.query_path)}  [{cats}]")
    searched = result.gating.wnids
    if result.gating.fell_back:
        listed = ", ".join(names[w] for w in searched[:5])
        more = f" and {len(searched) - 5} more" if len(searched) > 5 else ""
        closest = "nearest" if result.gating.order == "centroids" else "most probable"
        print(f"  none of its predicted categories is in the database; searched the "
              f"{len(searched)} {closest} ones it has: {listed}{more}")  # fmt: skip
    nearest = " nearest by centroid" if result.gating.order == "centroids" else ""
    walked = [x for x in result.gating.lists if x != ivf.NEW_ROWS]
    gated = f"in {len(searched)} categories{nearest}" if not result.gating.lists else \
        f"in the {len(walked)} nearest list{'s' * (len(walked) != 1)} of the inverted file " \
        "and the images added since it last placed new ones"  # fmt: skip
    where = {"gated": gated, "exact": "(every image)",
             "ivf": "(the nearest lists of the inverted file)"}[result.method]  # fmt: skip
    print(f"  searched {result.n_searched} images {where}")
    print(f"  {'rank':>4}  {'score':>6}  path")
    for rank, hit in enumerate(result.hits, start=1):
        print(f"  {rank:>4}  {hit.score:6.3f}  {shown(hit.path)}")


def cmd_info(args: argparse.Namespace) -> int:
    from cbir.api import open_db

    with open_db(args.db_dir) as db:
        info = db.info()
    sizes = info["categories"]
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return 0
    for key in ("db", "backbone", "weights", "feature_dim", "pooling", "top_k", "link", "engine",
                "precision", "resize",
                "format_version", "created", "updated", "images", "paths"):  # fmt: skip
        print(f"{key:>14}: {info[key]}")
    print(f"{'disk':>14}: {info['disk_bytes'] / 1e6:.1f} MB")
    inverted = info["inverted_file"]
    print(f"{'inverted file':>14}: " + ("none: gated queries search whole categories" if inverted
          is None else f"{inverted['lists']} lists, trained on {inverted['trained_on']} images; "
          f"{inverted['new_rows']} new images not in a list yet; gated queries walk the lists "
          "and search every new image"))  # fmt: skip
    head = info["query_head"]
    print(f"{'query head':>14}: " + ("none (cbir train learns one)" if head is None else
          f"trained on {head.get('images')} images of {head.get('classes')} classes from "
          f"{head.get('source')} at {head.get('trained_at')}"))  # fmt: skip
    print(f"{'categories':>14}: {len(sizes)}")
    for c in sizes[:20]:
        print(f"{c['images']:>14}  {c['id']} {c['name']}")
    if len(sizes) > 20:
        print(f"{'':>14}  ... {len(sizes) - 20} more (--json lists all)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cbir import evaluate, training
    from cbir.db import read_manifest

    read_manifest(args.db_dir)  # training needs an existing database
    if args.reset:
        if args.labelled_dir is not None or args.groups is not None:
            raise CbirError("--reset takes no labelled images")
        had = training.reset(args.db_dir, wait=args.wait, on_wait=_say)
        print(f"{shown(args.db_dir)}: " + ("query head removed: queries are plain again" if had
              else "has no query head: nothing to reset"), file=sys.stderr)  # fmt: skip
        return 0
    if (args.labelled_dir is None) == (args.groups is None):
        raise CbirError("give either a labelled folder or --groups FILE (or --reset)")
    source = args.groups if args.groups is not None else args.labelled_dir
    labels = (evaluate.labels_from_csv(args.groups) if args.groups is not None
              else evaluate.labels_from_folders(args.labelled_dir))  # fmt: skip
    options = training.TrainOptions(epochs=args.epochs, weights=args.weights,
                                    engine=args.engine, precision=args.precision,
                                    check=not args.no_check)  # fmt: skip
    bar = None

    def on_epoch(epoch: int, epochs: int, loss: float) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=epochs, unit="epoch", disable=not sys.stderr.isatty(),
                       file=sys.stderr, desc="training")  # fmt: skip
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update()

    try:
        report = training.train(args.db_dir, labels, str(source), options, on_epoch,
                                wait=args.wait, on_wait=_say)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    for bad in report.bad:
        print(f"cbir: skipped {shown(bad.path)}: {bad.reason}", file=sys.stderr)
    print(f"trained a query head on {report.n_images} images of {report.n_classes} classes "
          f"({report.from_database} from the database, {report.described} described) and "
          f"{report.background or 'none'} of the database's other images as background, in "
          f"{report.epochs} epochs, {report.seconds:.0f} s: loss {report.loss[0]:.3f} -> "
          f"{report.loss[-1]:.3f}. Queries of {shown(args.db_dir)} use it now; "
          f"'cbir train {shown(args.db_dir)} --reset' removes it.")  # fmt: skip
    check = report.check
    if check is not None:
        sample = (f" ({training.CHECK_QUERIES} of them queried)"
                  if max(check.n_seen, check.n_unseen) > training.CHECK_QUERIES else "")
        print(f"check, a head trained on half the images of half the classes, scored among "
              f"the held-out images: mAP {check.seen_before:.3f} -> {check.seen_after:.3f} on "
              f"the other {check.n_seen} images of those classes, {check.unseen_before:.3f} -> "
              f"{check.unseen_after:.3f} on the {check.n_unseen} images of the classes left "
              f"out{sample}")  # fmt: skip
        cost = check.unseen_before - check.unseen_after
        if cost > 0.01:
            print(f"cbir: on classes it was not trained on, the head cost {cost:.3f} mAP in the "
                  "check; label those classes too, or undo it with --reset", file=sys.stderr)
    elif options.check:
        print("check skipped: it needs 4 classes with 2 or more images, and classes of 4 or "
              "more to hold some out")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from cbir import categories
    from cbir.db import Database
    from cbir.plotting import plot_map
    from cbir.projection import project, spread_sample

    plot = _plot_target(args.plot)
    if args.thumbnails < 0:
        raise CbirError("--thumbnails must be 0 or more")
    names = categories.names_by_wnid()
    with Database.open(args.db_dir) as db:
        projection = project(db, args.method)
        labels, stored = [], []
        for image_id in projection.ids.tolist():
            record = db.image(image_id)
            paths = db.paths_of(image_id) if args.colour == "folder" else []
            labels.append(Path(paths[0]).parent.name if paths else names[record.wnids[0]])
            stored.append(db.stored_path(record))
    chosen = spread_sample(projection.points, args.thumbnails)
    method = {"tsne": "t-SNE", "pca": "PCA"}[projection.method]
    plot_map(projection.points, labels, [(i, stored[i]) for i in chosen], plot,
             f"{shown(args.db_dir)}: {len(labels)} images, {method}")  # fmt: skip
    print(f"saved map {shown(plot)} ({len(labels)} images, {method})", file=sys.stderr)
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    from cbir import categories
    from cbir.api import hit_json
    from cbir.concepts import find
    from cbir.db import Database

    if args.n_results < 1:
        raise CbirError("-n must be at least 1")
    with Database.open(args.db_dir) as db:
        result = find(db, args.words, args.n_results)
    names = categories.names_by_wnid()
    if args.json:
        print(json.dumps({
            "query": result.words,
            "concepts": [{"id": c.wnid, "name": c.word} for c in result.concepts],
            "classes": [{"id": w, "name": names[w]} for w in result.classes],
            "results": [hit_json(h, shown) for h in result.hits],
        }, ensure_ascii=False))  # fmt: skip
        return 0
    listed = ", ".join(names[w] for w in result.classes[:8])
    more = f" and {len(result.classes) - 8} more" if len(result.classes) > 8 else ""
    concepts = ", ".join(c.word for c in result.concepts)
    print(f"find {result.words!r}: {concepts} -> {len(result.classes)} classes ({listed}{more})")
    if not result.hits:
        print("  no image in the database is in these classes")
    for rank, hit in enumerate(result.hits, start=1):
        print(f"  {rank:>4}  {hit.score:6.3f}  {shown(hit.path)}")
    return 0


def cmd_duplicates(args: argparse.Namespace) -> int:
    from cbir.db import Database
    from cbir.duplicates import DEFAULT_THRESHOLD, find_duplicates, group_json

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    if not -1 <= threshold <= 1:
        raise CbirError("--threshold must be a cosine between -1 and 1")
    with Database.open(args.db_dir) as db:
        groups = find_duplicates(db, threshold)
    for group in groups:
        if args.json:
            print(json.dumps(group_json(group, shown), ensure_ascii=False))
        else:
            kind = "identical" if len(group.ids) == 1 else f"lowest cosine {group.score:.3f}"
            print(f"{len(group.paths)} files, {kind}:")
            for path in group.paths:
                print(f"  {shown(path)}")
    print(f"{len(groups)} group(s) of duplicates (threshold {threshold})", file=sys.stderr)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from cbir import categories
    from cbir.api import open_db

    with open_db(args.db_dir) as db:
        if args.category is None:
            for c in db.categories():
                if args.json:
                    print(json.dumps({"id": c.id, "name": c.name, "images": c.images}))
                else:
                    print(f"{c.images:>8}  {c.id}  {c.name}")
            return 0
        found = categories.find_wnids(args.category)
        if not found:
            raise CbirError(f"no ImageNet category is called {args.category!r} (see 'cbir ls "
                            f"{shown(args.db_dir)}' for the database's)")  # fmt: skip
        if len(found) > 1:
            raise CbirError(f"{len(found)} categories are called {args.category!r}: "
                            f"{', '.join(found)}; give one of these ids")  # fmt: skip
        wnid = found[0]
        offset, total = 0, None
        while total is None or offset < total:
            try:
                total, page = db.category_images(wnid, offset, 4096)
            except KeyError:
                raise CbirError(f"the database has no image in {wnid} "
                                f"{categories.names_by_wnid()[wnid]}") from None  # fmt: skip
            for im in page:
                if args.json:
                    print(json.dumps({"id": im.id, "path": shown(im.path),
                                      "paths": [shown(p) for p in im.paths],
                                      "categories": list(im.categories)}, ensure_ascii=False))
                else:
                    print(shown(im.path))
            offset += 4096
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cbir.api import open_db

    if not 0 <= args.port <= 65535:
        raise CbirError("--port must be between 0 and 65535")
    if args.max_upload_mb <= 0:
        raise CbirError("--max-upload-mb must be more than 0")
    from cbir.server import serve

    if args.host not in ("127.0.0.1", "::1", "localhost"):
        _say(f"warning: serving on {args.host}: anyone who can reach it can search the "
             "database and see its images")  # fmt: skip

    def ready(url: str) -> None:
        print(f"serving {shown(args.db_dir)} at {url}", flush=True)

    db = open_db(args.db_dir, weights=args.weights, engine=args.engine, precision=args.precision,
                 in_memory=True)  # fmt: skip
    with db, contextlib.suppress(KeyboardInterrupt):
        serve(db, args.host, args.port, int(args.max_upload_mb * 1024 * 1024), ready)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cbir import evaluate

    if (args.labelled_dir is None) == (args.groups is None):
        raise CbirError("give either a labelled folder or --groups FILE")
    if args.top_k < 1 or args.top_k > 1000:
        raise CbirError("--top-k must be between 1 and 1000")
    _check_search_options(args)
    if args.db is not None and not args.db.is_dir():
        raise CbirError(f"no database at {args.db}")
    if args.distractors is not None:
        if args.db is not None:
            raise CbirError("--distractors builds a temporary database: not with --db")
        if not args.distractors.is_dir():
            raise CbirError(f"--distractors: no folder at {shown(args.distractors)}")
    labels = (
        evaluate.labels_from_csv(args.groups)
        if args.groups
        else evaluate.labels_from_folders(args.labelled_dir)
    )
    search = evaluate.SearchSettings(top_k=args.top_k, min_candidates=args.min_candidates,
                                     query_expansion=args.query_expansion)  # fmt: skip
    options = evaluate.RunOptions(
        backbone=args.model, weights=args.weights, pooling=args.pooling, engine=args.engine,
        precision=args.precision, search=search, use_head=not args.no_head,
    )  # fmt: skip
    report = evaluate.run_evaluation(labels, options, args.db, args.distractors)
    ev = report.evaluation
    if args.json:
        data = {"backbone": report.backbone, "pooling": report.pooling,
                "not_indexed": report.not_indexed, "query_head": report.head,
                "gated_by": report.gated_by,
                **ev.to_json()}  # fmt: skip
        print(json.dumps(data))
        return 0
    s = ev.settings
    extras = ""
    if report.gated_by == "lists":
        extras += ", gated by the inverted lists"
    if report.head is not None:
        extras += f", query head trained on {report.head.get('images', '?')} images"
    extras += f", query expansion {s.query_expansion}" if s.query_expansion else ""
    print(f"{ev.n_images} images, {ev.n_queries} queries, {ev.n_labels} labels "
          f"({report.backbone}, {report.pooling}, top-k {s.top_k}, "
          f"min-candidates {s.min_candidates}{extras})")  # fmt: skip
    if report.not_indexed:
        print(f"{report.not_indexed} labelled file(s) are not in the database and were left out")
    print(f"{'':<11} {'mAP':>6} {'P@1':>6} {'P@5':>6} {'P@10':>6} {'R@10':>6}  rows/query")
    for name, sc in (("gated", ev.gated), ("exhaustive", ev.exhaustive)):
        values = (sc.map, sc.p_at_1, sc.p_at_5, sc.p_at_10, sc.r_at_10)
        print(f"{name:<11} " + " ".join(f"{v:6.3f}" for v in values)
              + f"  {sc.rows_searched:.1f} ({100 * sc.rows_share:.1f} %)")  # fmt: skip
    print(f"gating: keeps {100 * ev.top10_kept:.1f} % of the exhaustive top-10 and "
          f"{100 * ev.map_ratio:.1f} % of its mAP; {100 * ev.gated.no_relevant:.1f} % of "
          f"queries searched no relevant image")  # fmt: skip
    return 0


def _say(message: str) -> None:
    print(f"cbir: {message}", file=sys.stderr)


_bar = None


def _progress_bar(total: int) -> Callable[[int], None]:
    """A tqdm bar (count, rate, ETA) on a terminal; nothing when stderr is piped."""
    global _bar
    from tqdm import tqdm

    _bar = tqdm(total=total, unit="img", disable=not sys.stderr.isatty(), file=sys.stderr)
    return _bar.update


def _clear_progress(close: bool = False) -> None:
    """Make room for a message: the bar is cleared (and ended, before a last message)."""
    global _bar
    if _bar is not None:
        _bar.clear()
        if close:
            _bar.close()
            _bar = None
