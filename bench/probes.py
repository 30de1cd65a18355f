"""Child processes of bench_speed.py: each runs in a fresh interpreter, as a user's `cbir` does.

Each prints one JSON line of timings on stdout. `started` is this interpreter's first wall-clock
reading, so the parent can tell interpreter start-up apart from cbir's own work.

    python bench/probes.py create-db -- CBIR_ARGS...   load the model first, then run the CLI
    python bench/probes.py query DB_DIR IMAGE          one cold query, split into its steps
    python bench/probes.py run RESULT -- COMMAND...    COMMAND's wall time and peak RSS
"""

import time

STARTED = time.time()  # noqa: E402 - before any import, to time the interpreter's start-up

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def create_db(cbir_args: list[str]) -> dict[str, object]:
    """`cbir create-db` with the model loaded before the clock starts: its steady-state speed.

    load_model is memoised, and called here with the arguments the CLI will pass it, so the
    CLI reuses this model and `index_s` covers walk, hash, decode, forward and store only.
    """
    from cbir.cli import build_parser, main
    from cbir.model import load_model

    t0 = time.perf_counter()
    args = build_parser().parse_args(cbir_args)
    model = load_model(args.model, args.weights, args.engine, args.precision)
    t1 = time.perf_counter()
    rc = main(cbir_args)
    t2 = time.perf_counter()
    return {
        "started": STARTED,
        "rc": rc,
        "load_s": t1 - t0,
        "index_s": t2 - t1,
        "engine": model.engine,
        "precision": model.precision,
        "timings": asdict(model.timings),
    }


def query(db_dir: Path, image: Path) -> dict[str, object]:
    """The steps of `cbir query DB IMAGE` (cbir.query.run_queries), each timed on its own."""
    t0 = time.perf_counter()
    from cbir.db.database import CategoryMembers
    from cbir.images import load_image
    from cbir.query import QueryOptions, open_for_query, search

    t1 = time.perf_counter()
    options = QueryOptions()
    db, model = open_for_query(db_dir, options)
    t2 = time.perf_counter()
    pixels = load_image(image, model.backbone.input_size)
    t3 = time.perf_counter()
    described = model.describe(pixels[None])
    t4 = time.perf_counter()
    feature = described.features[db.settings.pooling][0]
    result = search(db, image, described.probs[0], feature, CategoryMembers(db), options)
    t5 = time.perf_counter()
    return {
        "started": STARTED,
        "cbir_import_s": t1 - t0,
        "open_s": t2 - t1,  # reading the manifest + loading the model (the timings below)
        "timings": asdict(model.timings),
        "engine": model.engine,
        "precision": model.precision,
        "decode_s": t3 - t2,
        "forward_s": t4 - t3,
        "search_s": t5 - t4,
        "rows_searched": result.n_searched,
        "total_s": t5 - t0,
    }


def run(result_path: Path, command: list[str]) -> int:
    """Run `command`; write its wall time, peak RSS and start time to `result_path`.

    On Linux a child's ru_maxrss starts at its parent's peak RSS (the parent's memory map is
    copied at fork), so the benchmark, which holds large models, starts every command through
    this small process. Returns the command's exit code.
    """
    spawned = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    wall_s = time.perf_counter() - start
    result = {"spawned": spawned, "wall_s": wall_s, "max_rss_mb": usage.ru_maxrss / 1024}
    result_path.write_text(json.dumps(result))
    return os.waitstatus_to_exitcode(status)


def _after_dashes(args: list[str]) -> list[str]:
    return args[1:] if args[:1] == ["--"] else args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("create-db")
    p.add_argument("cbir_args", nargs=argparse.REMAINDER)
    p = commands.add_parser("query")
    p.add_argument("db_dir", type=Path)
    p.add_argument("image", type=Path)
    p = commands.add_parser("run")
    p.add_argument("result_path", type=Path)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.command == "run":
        return run(args.result_path, _after_dashes(args.argv))
    if args.command == "create-db":
        result = create_db(_after_dashes(args.cbir_args))
    else:
        result = query(args.db_dir, args.image)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
