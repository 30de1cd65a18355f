"""`cbir duplicates`: pair precision and recall by threshold, and its cost at 60k images.

    python bench/bench_duplicates.py          # about 2 minutes once the 60k database exists

Quality: a database of ../shared/testdata/photos (37 photos, the distractors) and
near_duplicates/ (8 variants of each of 8 of those photos: blur, brightness, crop, grey, half
size, mirror, JPEG q30, 5 degree rotation), built with efficientnet_lite0. The true pairs are
the pairs of files of one original (the original and its variants: 8 x 36 = 288); a found
pair is two files in one group. Printed per threshold: pair precision, recall and F1.

Cost: `cbir duplicates --json` on bench_db.py's 60k Fashion-MNIST database (built first if
missing, in the same work folder): wall time and peak RSS of the process, and the groups found.
Targets: under a minute, within 1 GB.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_db import TESTDATA, Bench, bench_arguments, fashion  # noqa: E402

THRESHOLDS = [0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def original_of(path: str) -> str | None:
    """The photo a file shows: a variant's stem before '__', a photo's own stem (None for the
    photos that have no variants)."""
    name = Path(path).stem
    return name.split("__")[0] if "__" in name else name


def quality(bench: Bench) -> list[dict[str, Any]]:
    source = bench.work / "duplicates-source"
    if not source.is_dir():
        shutil.copytree(TESTDATA / "photos", source / "photos")
        shutil.copytree(TESTDATA / "near_duplicates", source / "near_duplicates")
    db, _ = bench.build("duplicates", source)
    variants = sorted((TESTDATA / "near_duplicates").glob("*.jpg"))
    stems = {original_of(str(v)) for v in variants}
    files = [str(p) for p in sorted(source.rglob("*.jpg"))]
    truth = {frozenset(pair) for pair in itertools.combinations(files, 2)
             if original_of(pair[0]) == original_of(pair[1]) in stems}  # fmt: skip
    rows = []
    for threshold in THRESHOLDS:
        out = bench.cbir("duplicates", str(db), "--json", "--threshold", str(threshold))
        found = set()
        for line in out["stdout"].splitlines():
            paths = json.loads(line)["paths"]
            found |= {frozenset(pair) for pair in itertools.combinations(paths, 2)}
        hits = len(found & truth)
        precision = hits / len(found) if found else 1.0
        recall = hits / len(truth)
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        rows.append({"threshold": threshold, "pairs_found": len(found), "true_pairs": len(truth),
                     "precision": precision, "recall": recall, "f1": f1})  # fmt: skip
    return rows


def cost(bench: Bench) -> dict[str, Any]:
    train, _ = fashion(bench.work)
    db, _ = bench.build("fashion60k", train)
    out = bench.cbir("duplicates", str(db), "--json")
    groups = [json.loads(line) for line in out["stdout"].splitlines()]
    sizes = sorted((len(g["paths"]) for g in groups), reverse=True)
    return {"wall_s": out["wall_s"], "max_rss_mb": out["max_rss_mb"], "groups": len(groups),
            "largest_groups": sizes[:5], "files_in_groups": sum(sizes)}  # fmt: skip


def main() -> None:
    args = bench_arguments(__doc__).parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.work_dir)
    results = {"quality": quality(bench), "fashion60k": cost(bench)}
    print("| threshold | pairs found | precision | recall | F1 |")
    print("| --- | --- | --- | --- | --- |")
    for r in results["quality"]:
        print(f"| {r['threshold']:.2f} | {r['pairs_found']} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {r['f1']:.3f} |")  # fmt: skip
    c = results["fashion60k"]
    print(f"\n60k Fashion-MNIST: {c['wall_s']:.1f} s, peak RSS {c['max_rss_mb']:.0f} MB, "
          f"{c['groups']} groups holding {c['files_in_groups']} files (largest: "
          f"{c['largest_groups']}); targets < 60 s, < 1024 MB")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
