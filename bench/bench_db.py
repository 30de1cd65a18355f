"""Database v2 at library size: does a query cost what its answer costs, not the database?

    apt-get install dataset-fashion-mnist          # the 70,000 real images (once)
    python bench/bench_db.py                       # 37 photos and 60k Fashion-MNIST
    python bench/bench_db.py --synthetic 1000000   # and 1M synthetic rows (see below)

For the 37-photo test database and the 60,000 Fashion-MNIST training images (both built with
`cbir create-db --model efficientnet_lite0`), in one run: create-db's rate, disk use per image,
`cbir query` wall time and peak RSS for 1 and 20 query images gated and for `--all`, and the
latency of a second query in one process. The baseline is one gated query on the 37-photo
database, measured in the same run; the targets are ratios to it.

`--synthetic N` also writes N rows through the real writer (cbir.db.open_writer, hard-linked
copies of a few files, commits of 16384 images, timed commits of 1024 at the start and the end),
with features made from the 60k database's real ones (each a real feature plus noise, so they
cluster as real features do) and 4 categories drawn uniformly from the 1000 classes. It then
times, in one process, gated and `--all` queries (approximate through the inverted file, and
exact), states the IVF's recall@10 against exact search, and the process's peak RSS.

Work folder (default $TMPDIR/cbir-bench-db) keeps the exported images and built databases
between runs (`--rebuild` makes them anew; a reused build reports the figures of the run that
built it). Nothing is downloaded (CBIR_OFFLINE=1); the OpenVINO cache lives in the work folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PROBES = Path(__file__).resolve().parent / "probes.py"
TESTDATA = REPO.parent / "shared" / "testdata"
MODEL = ["--model", "efficientnet_lite0"]
REPEATS = 3  # CLI runs per measurement: median wall, largest peak RSS
SMALL_COMMIT = 1024  # images in a commit of cbir create-db (its --commit-every)
SMALL_SAMPLES = 3  # commits of SMALL_COMMIT whose median is one point of the commit curve
TARGETS = {"gated_20": 3.0, "all_1": 2.5, "rss_mb": 600.0,
           "million_gated_ms": 50.0, "million_all_ms": 150.0, "million_rss_mb": 1536.0,
           "million_commit_growth": 1.5}  # fmt: skip  (flat: our reading, the issue gives none)


def bench_arguments(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark here takes: its work folder (shared) and a JSON output."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--work-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "cbir-bench-db")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "?")  # fmt: skip
    return f"{cpu}, {os.cpu_count()} cores"


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.cache = work / "openvino-cache"
        self.env = {**os.environ, "CBIR_OFFLINE": "1", "CBIR_CACHE_DIR": str(self.cache),
                    "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}  # fmt: skip

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def run(self, *command: str) -> dict[str, Any]:
        """Wall time, peak RSS and output of a child, measured by probes.py (see its `run`)."""
        result = self.work / "child.json"
        done = subprocess.run([sys.executable, str(PROBES), "run", str(result), "--", *command],
                              env=self.env, capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return {**json.loads(result.read_text()), "stdout": done.stdout, "stderr": done.stderr}

    def cbir(self, *args: str) -> dict[str, Any]:
        return self.run(sys.executable, "-m", "cbir", *args)

    def build(self, name: str, source: Path) -> tuple[Path, dict[str, Any]]:
        """A database of `source`, built once: (its folder, the build's figures)."""
        db, record = self.work / f"{name}.db", self.work / f"{name}.build.json"
        if db.exists() and record.exists():
            return db, json.loads(record.read_text())
        shutil.rmtree(db, ignore_errors=True)
        self.log(f"create-db {source} -> {db}")
        child = self.cbir("create-db", str(source), str(db), *MODEL)
        n = json.loads(self.cbir("info", str(db), "--json")["stdout"])["images"]
        figures = {"images": n, "wall_s": child["wall_s"], "max_rss_mb": child["max_rss_mb"],
                   "rate": n / child["wall_s"], "built": time.strftime("%Y-%m-%d %H:%M")}
        record.write_text(json.dumps(figures))
        return db, figures

    def queries(self, db: Path, images: list[Path]) -> dict[str, Any]:
        """cbir query: 1 image gated, 20 gated, 1 with --all (median wall of REPEATS runs),
        and a second query's latency in one process."""
        self.cbir("query", str(db), str(images[0]), "--json")  # warms the OpenVINO cache
        out: dict[str, Any] = {}
        for key, args in (("gated_1", [images[0]]), ("gated_20", images[:20]),
                          ("all_1", [images[0], "--all"])):  # fmt: skip
            runs = [self.cbir("query", str(db), *map(str, args), "--json")
                    for _ in range(REPEATS)]  # fmt: skip
            lines = [json.loads(line) for line in runs[-1]["stdout"].splitlines()]
            out[key] = {"wall_s": statistics.median(r["wall_s"] for r in runs),
                        "max_rss_mb": max(r["max_rss_mb"] for r in runs),
                        "searched": statistics.mean(line["searched"] for line in lines)}
        child = self.run(sys.executable, str(Path(__file__)), "_second-query", str(db),
                         *map(str, images[:6]))  # fmt: skip
        out["second_query_ms"] = json.loads(child["stdout"].splitlines()[-1])
        check = self.cbir("check", str(db))
        out["check"] = {"wall_s": check["wall_s"], "max_rss_mb": check["max_rss_mb"]}
        info = json.loads(self.cbir("info", str(db), "--json")["stdout"])
        out["disk_bytes_per_image"] = info["disk_bytes"] / info["images"]
        out["disk_parts_per_image"] = disk_parts(db, info["images"])
        return out


def disk_parts(db: Path, n_images: int) -> dict[str, float]:
    """Bytes per image of each kind of file (hard-linked copies counted once)."""
    parts: dict[str, float] = {}
    seen: set[tuple[int, int]] = set()
    for folder, _, names in os.walk(db):
        for name in names:
            info = os.lstat(os.path.join(folder, name))
            if (info.st_dev, info.st_ino) in seen or not os.path.isfile(os.path.join(folder, name)):
                continue
            seen.add((info.st_dev, info.st_ino))
            kind = ("matrix" if name.startswith("matrix-") else "category .npz"
                    if name.endswith(".npz") and folder != str(db) else "catalog"
                    if name.startswith("catalog") else "stored copies"
                    if folder != str(db) else "other")  # fmt: skip
            parts[kind] = parts.get(kind, 0) + info.st_size / n_images
    return parts


def second_query(db_dir: Path, images: list[Path]) -> None:
    """Child: ms of a gated and an --all query once the model and database are warm."""
    from cbir.query import QueryOptions, open_for_query, run_queries

    db, model = open_for_query(db_dir, QueryOptions())
    timings: dict[str, float] = {}
    for key, options in (("gated", QueryOptions()), ("all", QueryOptions(search_all=True))):
        run_queries(db, model, images[:1], options)  # the first query of its kind: warm-up
        times = []
        for image in images[1:]:
            start = time.perf_counter()
            run_queries(db, model, [image], options)
            times.append(1000 * (time.perf_counter() - start))
        timings[key] = statistics.median(times)
    print(json.dumps(timings))


# -- synthetic rows at library size ------------------------------------------------------------


def build_synthetic(
    db_dir: Path, n: int, real_db: Path, record: Path, commit_size: int = 16384,
    remove_after: bool = False, first: int = 0, small_every: int = 0,
) -> None:
    """Child: n synthetic images written through the real writer in commits of `commit_size`;
    each commit's time to `record`. Images are numbered from `first` (their content and
    source path follow from it); with `remove_after` they are removed again at the end. With
    `small_every`, every small_every-th commit is one of SMALL_COMMIT images instead (the size
    `cbir create-db` commits), which times such commits at every size the database goes
    through."""
    from cbir import categories
    from cbir.db import Database, NewImage, Settings, open_writer

    with Database.open(real_db) as real:
        real_features = real.matrix().gather(real.catalog.all_rows()[1])
    dim = real_features.shape[1]
    rng = np.random.default_rng(7)
    wnids = categories.wnids()
    sources = db_dir.parent / f"{db_dir.stem}-sources"  # its own inodes: links are per inode
    sources.mkdir(exist_ok=True)

    def source_of(i: int) -> Path:
        """Image i's own source path: a hard link to one file of every 12000 images (each
        has 5 links: its source and 4 category copies; ext4 allows 65000 per inode)."""
        shared = sources / f"{i // 12000}.jpg"
        if not shared.exists():
            shared.write_bytes(b"one file behind 12000 synthetic images' hard links")
        path = source_of_path(sources, i)
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            os.link(shared, path)
        return path

    def chunk(start: int, size: int) -> list[NewImage]:
        base = real_features[np.arange(start, start + size) % len(real_features)]
        noise = rng.standard_normal((size, dim)).astype(np.float32) * (0.3 / np.sqrt(dim))
        features = base + noise
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        images = []
        for i in range(size):
            sha = hashlib.sha256(b"synthetic %d" % (start + i)).hexdigest()
            picked = rng.choice(1000, 4, replace=False)
            probs = np.sort(rng.dirichlet(np.ones(8))[:4])[::-1]
            images.append(NewImage(source_of(start + i), sha, 1, 1, tuple(wnids[j] for j in picked),
                                   tuple(float(p) for p in probs), features[i]))  # fmt: skip
        return images

    settings = Settings("synthetic", "none", dim, top_k=4, link="hardlink")
    commits: list[dict[str, float]] = []
    done = first
    with open_writer(db_dir, settings) as writer:
        while done < first + n:
            small = small_every and len(commits) % small_every == 0
            size = min(SMALL_COMMIT if small else commit_size, first + n - done)
            images = chunk(done, size)
            trained, recorded = writer.catalog.ivf_state(), writer.catalog.recorded_rows()
            start = time.perf_counter()
            writer.add_images(images)
            commits.append({"before": writer.n_images() - size, "images": size,
                            "s": time.perf_counter() - start,
                            "trained_ivf": writer.catalog.ivf_state() != trained,
                            "wrote_category_files": writer.catalog.recorded_rows() != recorded})
            done += size
            if len(commits) % 5 == 0:
                print(f"{done} rows", file=sys.stderr, flush=True)
        if remove_after:  # the probe leaves the database as it found it
            writer.remove_paths(str(source_of_path(sources, i)) for i in range(first, done))
    record.write_text(json.dumps(commits))


def source_of_path(sources: Path, i: int) -> Path:
    return sources / str(i // 4096) / f"{i}.jpg"


def synthetic_queries(db_dir: Path, queries_file: Path) -> None:
    """Child: in-process gated and --all latencies, IVF recall@10, on the synthetic database."""
    from cbir.db import ivf
    from cbir.db.database import CategoryMembers
    from cbir.query import QueryOptions, search

    features = np.load(queries_file)
    rng = np.random.default_rng(11)
    db = __import__("cbir.db", fromlist=["Database"]).Database.open(db_dir)
    members = CategoryMembers(db)
    n_lists = len(db.ivf()) if db.ivf() is not None else 0
    out: dict[str, Any] = {"rows": db.n_images(), "ivf_lists": n_lists}

    def timed(options: QueryOptions, feature: np.ndarray, probs: np.ndarray) -> tuple:
        start = time.perf_counter()
        result = search(db, Path("q"), probs, feature, members, options)
        return 1000 * (time.perf_counter() - start), result

    probs_of = [rng.dirichlet(np.ones(1000)).astype(np.float32) for _ in features]
    for key, options in (("gated", QueryOptions()), ("all_ivf", QueryOptions(search_all=True))):
        timed(options, features[0], probs_of[0])  # warm-up
        # The first pass reads rows the page cache may not hold (right after a build it holds
        # what was written last); the second is a warm process, as `cbir serve` is.
        first, runs = ([timed(options, f, p) for f, p in zip(features[1:], probs_of[1:],
                                                             strict=True)] for _ in range(2))
        out[key] = {"ms": statistics.median(ms for ms, _ in runs),
                    "first_pass_ms": statistics.median(ms for ms, _ in first),
                    "searched": statistics.mean(r.n_searched for _, r in runs)}  # fmt: skip
    exact_runs = [timed(QueryOptions(search_all=True, exact=True), f, p)
                  for f, p in zip(features[:10], probs_of[:10], strict=True)]  # fmt: skip
    out["all_exact"] = {"ms": statistics.median(ms for ms, _ in exact_runs)}
    exact_top = [[h.id for h in r.hits] for _, r in exact_runs]
    gated_top = [[h.id for h in timed(QueryOptions(), f, p)[1].hits]
                 for f, p in zip(features[:10], probs_of[:10], strict=True)]  # fmt: skip
    out["gated_recall_at_10"] = float(np.mean([len(set(a) & set(b)) / len(b) for a, b in
                                               zip(gated_top, exact_top, strict=True)]))
    out["recall_at_10"] = {}
    for share in (1 / 64, 1 / 32, 1 / 16):
        nprobe = max(1, round(n_lists * share))
        options = QueryOptions(search_all=True, nprobe=nprobe, query_expansion=3)
        found = [[h.id for h in timed(options, f, p)[1].hits]
                 for f, p in zip(features[:10], probs_of[:10], strict=True)]  # fmt: skip
        pairs = zip(found, exact_top, strict=True)
        recall = np.mean([len(set(a) & set(b)) / len(b) for a, b in pairs])
        out["recall_at_10"][f"nprobe {nprobe} ({share:.3f} of lists)"] = float(recall)
    out["default_nprobe"] = max(1, round(n_lists * ivf.DEFAULT_PROBE_SHARE))
    print(json.dumps(out))


# -- the run and its report --------------------------------------------------------------------


def fashion(work: Path) -> tuple[Path, list[Path]]:
    """The 60k training images and 20 test images (two per class) as class folders."""
    train, test = work / "fashion-train", work / "fashion-test"
    export = [sys.executable, str(REPO / "bench" / "export_fashion_mnist.py")]
    if not (train / "ankle_boot").is_dir() or len(list(train.rglob("*.png"))) != 60000:
        subprocess.run([*export, str(train), "--per-class", "6000", "--split", "train"], check=True)
    if not test.is_dir():
        subprocess.run([*export, str(test), "--per-class", "2", "--split", "test"], check=True)
    return train, sorted(test.rglob("*.png"))


def report(r: dict[str, Any]) -> str:
    small, large = r["photos"], r["fashion"]
    base = small["queries"]["gated_1"]["wall_s"]
    lines = [f"Machine: {r['machine']}", "",
             f"{'':44}{'37 photos':>16}{'60k Fashion-MNIST':>20}"]  # fmt: skip

    def row(label: str, get: Any, fmt: str) -> None:
        lines.append(f"{label:44}{format(get(small), fmt):>16}{format(get(large), fmt):>20}")

    row("create-db, images/s", lambda d: d["build"]["rate"], ".0f")
    row("create-db, peak RSS MB", lambda d: d["build"]["max_rss_mb"], ".0f")
    for key, label in (("gated_1", "1 image, gated"), ("gated_20", "20 images, gated"),
                       ("all_1", "1 image, --all")):  # fmt: skip
        row(f"cbir query {label}: wall s", lambda d, k=key: d["queries"][k]["wall_s"], ".2f")
        row(f"cbir query {label}: peak RSS MB", lambda d, k=key: d["queries"][k]["max_rss_mb"],
            ".0f")  # fmt: skip
        row(f"cbir query {label}: rows/query", lambda d, k=key: d["queries"][k]["searched"],
            ".0f")  # fmt: skip
    row("second query in-process, gated: ms", lambda d: d["queries"]["second_query_ms"]["gated"],
        ".1f")  # fmt: skip
    row("second query in-process, --all: ms", lambda d: d["queries"]["second_query_ms"]["all"],
        ".1f")  # fmt: skip
    row("cbir check: wall s", lambda d: d["queries"]["check"]["wall_s"], ".1f")
    row("cbir check: peak RSS MB", lambda d: d["queries"]["check"]["max_rss_mb"], ".0f")
    row("disk per image, bytes", lambda d: d["queries"]["disk_bytes_per_image"], ".0f")
    for part in sorted(large["queries"]["disk_parts_per_image"]):
        row(f"  {part}", lambda d, p=part: d["queries"]["disk_parts_per_image"].get(p, 0), ".0f")
    q = large["queries"]
    checks = [
        ("60k: 20 gated images / 1 on 37 photos", q["gated_20"]["wall_s"] / base,
         TARGETS["gated_20"], "x"),
        ("60k: --all 1 image / 1 on 37 photos", q["all_1"]["wall_s"] / base, TARGETS["all_1"],
         "x"),
        ("60k: peak RSS of a query, MB", max(q[k]["max_rss_mb"] for k in ("gated_20", "all_1")),
         TARGETS["rss_mb"], ""),
    ]  # fmt: skip
    if "synthetic" in r:
        s = r["synthetic"]
        commits = s["commits"]
        tenths = [commits[len(commits) * t // 10 : len(commits) * (t + 1) // 10]
                  for t in range(10)]  # fmt: skip
        per_image = [sum(c["s"] for c in part) / sum(c["images"] for c in part)
                     for part in tenths if part]  # fmt: skip  (merges included, amortised)
        early, late = per_image[0], per_image[-1]
        small = [c for c in commits if c["images"] == SMALL_COMMIT
                 and not c.get("wrote_category_files", True) and not c["trained_ivf"]]  # fmt: skip
        lines += ["", f"Synthetic: {s['queries']['rows']} rows, {s['queries']['ivf_lists']} IVF "
                  f"lists, built in {s['build_s']:.0f} s",
                  f"  commits of up to {max(c['images'] for c in commits)}, ms per image (with "
                  f"category files and merges) by tenth of the build: "
                  + " ".join(f"{1000 * t:.2f}" for t in per_image)
                  + f" (last / first {late / early:.2f}; the first precedes any merge)",
                  f"  commits of {SMALL_COMMIT} during the build (no category files written), "
                  "ms at rows: " + ", ".join(f"{c['before'] // 1000}k: {1000 * c['s']:.0f}"
                                             for c in small),
                  "  slowest commits: " + ", ".join(
                      f"{c['s']:.1f} s at {c['before']}" for c in
                      sorted(commits, key=lambda c: -c["s"])[:3]),
                  f"  gated query: {s['queries']['gated']['ms']:.1f} ms "
                  f"({s['queries']['gated']['searched']:.0f} rows; recall@10 against exact "
                  f"search {s['queries'].get('gated_recall_at_10', float('nan')):.2f})"
                  + _first_pass(s["queries"]["gated"]),
                  f"  --all, IVF (default nprobe {s['queries']['default_nprobe']}): "
                  f"{s['queries']['all_ivf']['ms']:.1f} ms "
                  f"({s['queries']['all_ivf']['searched']:.0f} rows)"
                  + _first_pass(s["queries"]["all_ivf"]),
                  f"  --all --exact: {s['queries']['all_exact']['ms']:.0f} ms",
                  "  recall@10 of the IVF against exact search: " + ", ".join(
                      f"{k}: {v:.2f}" for k, v in s["queries"]["recall_at_10"].items()),
                  f"  peak RSS of the query process: {s['max_rss_mb']:.0f} MB",
                  f"  commits of 1024 images, median: {1000 * s['probe']['fresh']:.0f} ms into an "
                  f"empty database, {1000 * s['probe']['full']:.0f} ms into this one "
                  f"(ratio {s['probe']['full'] / s['probe']['fresh']:.2f})",
                  f"  cbir check: {s['check']['wall_s']:.0f} s, peak RSS "
                  f"{s['check']['max_rss_mb']:.0f} MB"
                  + (" (not run: --check-synthetic runs it)"
                     if math.isnan(s["check"]["wall_s"]) else "")]
        checks += [
            ("1M: in-process gated query, ms", s["queries"]["gated"]["ms"],
             TARGETS["million_gated_ms"], ""),
            ("1M: in-process --all (IVF), ms", s["queries"]["all_ivf"]["ms"],
             TARGETS["million_all_ms"], ""),
            ("1M: peak RSS of the query process, MB", s["max_rss_mb"],
             TARGETS["million_rss_mb"], ""),
            ("1M: commit ms/image, last / second tenth", late / per_image[1],
             TARGETS["million_commit_growth"], "x"),
        ]  # fmt: skip
        if len(small) >= 2 * SMALL_SAMPLES + 1:
            # one such commit moves by a third from run to run (cause not found), so the first
            # few after the empty one are compared with the last few, by median
            middle = small[1 : 1 + SMALL_SAMPLES]
            end = small[-SMALL_SAMPLES:]
            checks.append((f"1M: commits of {SMALL_COMMIT}, last {SMALL_SAMPLES} / "
                           f"{SMALL_SAMPLES} from {middle[0]['before'] // 1000}k",
                           statistics.median(c["s"] for c in end)
                           / statistics.median(c["s"] for c in middle),
                           TARGETS["million_commit_growth"], "x"))
    lines += ["", f"{'target':44}{'measured':>12}{'limit':>10}"]
    for label, value, limit, unit in checks:
        verdict = "PASS" if value <= limit else "FAIL"
        lines.append(f"{label:44}{value:>11.2f}{unit:1}{limit:>9.1f}{unit:1}  {verdict}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_second-query":
        return second_query(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
    if len(sys.argv) > 1 and sys.argv[1] == "_build-synthetic":
        return build_synthetic(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]),
                               Path(sys.argv[5]), small_every=6)  # fmt: skip
    if len(sys.argv) > 1 and sys.argv[1] == "_commit-probe":  # 10 commits of 1024, removed after
        return build_synthetic(Path(sys.argv[2]), 10 * 1024, Path(sys.argv[3]),
                               Path(sys.argv[4]), commit_size=1024, remove_after=True,
                               first=int(sys.argv[5]))  # fmt: skip
    if len(sys.argv) > 1 and sys.argv[1] == "_synthetic-queries":
        return synthetic_queries(Path(sys.argv[2]), Path(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "cbir-bench-db")  # fmt: skip
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="also measure N synthetic rows (1000000 for the issue's figures)")
    parser.add_argument("--check-synthetic", action="store_true",
                        help="also time cbir check of the synthetic database (minutes at 1M)")
    parser.add_argument("--skip-small", action="store_true",
                        help="reuse the 37-photo and 60k results of an earlier --json file")
    parser.add_argument("--rebuild", action="store_true", help="build every database anew")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    work = args.work_dir
    if args.rebuild:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(work)
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "?")  # fmt: skip
    results: dict[str, Any] = {"machine": f"{cpu}, {os.cpu_count()} cores"}
    started = time.perf_counter()
    train, test_images = fashion(work)
    if args.skip_small and args.json and args.json.exists():
        earlier = json.loads(args.json.read_text())
        results["photos"], results["fashion"] = earlier["photos"], earlier["fashion"]
        fashion_db = work / "fashion60k.db"
    else:
        photos_db, photos_build = bench.build("photos", TESTDATA / "photos")
        near = sorted((TESTDATA / "near_duplicates").glob("*.jpg"))[:20]
        bench.log("queries on the 37-photo database")
        results["photos"] = {"build": photos_build, "queries": bench.queries(photos_db, near)}
        fashion_db, fashion_build = bench.build("fashion60k", train)
        bench.log("queries on the 60k database")
        results["fashion"] = {"build": fashion_build,
                              "queries": bench.queries(fashion_db, test_images)}  # fmt: skip
    if args.synthetic:
        results["synthetic"] = synthetic(bench, args.synthetic, fashion_db, test_images,
                                         args.check_synthetic)  # fmt: skip
    results["total_s"] = time.perf_counter() - started
    text = report(results)
    print(text)
    print(f"\n(benchmark took {results['total_s']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def _first_pass(timing: dict[str, float]) -> str:
    if "first_pass_ms" not in timing:
        return ""
    return f"; the same queries' first pass: {timing['first_pass_ms']:.1f} ms"


def synthetic(
    bench: Bench, n: int, fashion_db: Path, test_images: list[Path], with_check: bool
) -> dict[str, Any]:
    db = bench.work / f"synthetic{n}.db"
    record = bench.work / f"synthetic{n}.commits.json"
    build_record = bench.work / f"synthetic{n}.build.json"
    if not (db.exists() and record.exists() and build_record.exists()):
        shutil.rmtree(db, ignore_errors=True)
        bench.log(f"writing {n} synthetic rows through the writer")
        child = bench.run(sys.executable, str(Path(__file__)), "_build-synthetic", str(db), str(n),
                          str(fashion_db), str(record))  # fmt: skip
        build_record.write_text(json.dumps({"build_s": child["wall_s"]}))
    queries_file = bench.work / "fashion-test-features.npy"
    if not queries_file.exists():
        from cbir.images import load_image
        from cbir.model import load_model

        model = load_model("efficientnet_lite0")
        pixels = np.stack([load_image(p, 224) for p in test_images])
        np.save(queries_file, model.describe(pixels).features["gap"])
    bench.log("queries on the synthetic database")
    child = bench.run(sys.executable, str(Path(__file__)), "_synthetic-queries", str(db),
                      str(queries_file))  # fmt: skip
    bench.log("commits of 1024 images into an empty and into the synthetic database")
    probe: dict[str, float] = {}
    probes = (("fresh", bench.work / "probe-empty.db", 4 * n), ("full", db, 3 * n))
    for key, target, first in probes:
        shutil.rmtree(bench.work / "probe-empty.db", ignore_errors=True)
        probe_record = bench.work / "probe.json"
        bench.run(sys.executable, str(Path(__file__)), "_commit-probe", str(target),
                  str(fashion_db), str(probe_record), str(first))  # fmt: skip
        probe[key] = statistics.median(c["s"] for c in json.loads(probe_record.read_text()))
    check = {"wall_s": float("nan"), "max_rss_mb": float("nan")}
    if with_check:
        bench.log("cbir check of the synthetic database")
        check = bench.cbir("check", str(db))
    return {"commits": json.loads(record.read_text()), **json.loads(build_record.read_text()),
            "queries": json.loads(child["stdout"].splitlines()[-1]),
            "max_rss_mb": child["max_rss_mb"], "probe": probe,
            "check": {"wall_s": check["wall_s"], "max_rss_mb": check["max_rss_mb"]}}  # fmt: skip


if __name__ == "__main__":
    main()
