"""Figures of queries beside their best results, saved to a file (Agg backend, never shown).

Each query gets rows of up to RESULTS_PER_ROW results, numbered by rank, with the cosine
score and as much of the path as tells the shown files apart (two IMG_0001.jpg get their
folders). Any file name renders: glyphs come from the installed fonts (CJK fonts included,
when present), and a character no font has is written as its code (\\u732b), never as an
empty box with a warning.
"""

from __future__ import annotations

import logging
import textwrap
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cbir.errors import BadImage
from cbir.images import thumbnail
from cbir.query import Hit, QueryResult

MAX_RESULTS = 20  # results a figure shows per query (-n beyond it: the first 20)
RESULTS_PER_ROW = 5
FONT_SIZE = 10
LABEL_WIDTH = 26  # characters per line of a label
# Families tried after DejaVu Sans (matplotlib's own) for glyphs it lacks, where installed.
FALLBACK_FAMILIES = ("Noto Sans CJK JP", "Noto Sans CJK SC", "WenQuanYi Zen Hei",
                     "WenQuanYi Micro Hei", "Droid Sans Fallback", "AR PL UMing CN",
                     "Source Han Sans", "Noto Sans", "Noto Sans Symbols2")  # fmt: skip


def plot_results(results: list[QueryResult], out_path: Path, n_results: int = 10) -> list[str]:
    """Save one block of rows per query: the query image, then its best `n_results` hits
    (at most MAX_RESULTS), RESULTS_PER_ROW to a row. Returns the panels' titles, in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # "Failed to find font weight normal for WenQuanYi Zen Hei, now using 500": harmless.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    families, covered = _fonts()
    shown = min(n_results, MAX_RESULTS)
    blocks = [max(1, -(-min(shown, len(r.hits)) // RESULTS_PER_ROW)) for r in results]
    n_cols = 1 + min(shown, RESULTS_PER_ROW, max((len(r.hits) for r in results), default=1))
    n_rows = sum(blocks)
    titles: list[str] = []
    with plt.rc_context({"font.family": families, "font.size": FONT_SIZE,
                         "text.parse_math": False}):
        fig, axes = plt.subplots(n_rows, max(n_cols, 2), figsize=(2.9 * max(n_cols, 2),
                                 3.3 * n_rows), squeeze=False)  # fmt: skip
        for ax in axes.flat:
            ax.axis("off")
        row = 0
        for result, block in zip(results, blocks, strict=True):
            top = result.categories[0] if result.categories else None
            title = "query\n" + _wrapped(result.query_path.name, covered)
            if top is not None:
                title += f"\npredicted: {top.name.replace('_', ' ')} ({top.prob:.2f})"
            _show(axes[row][0], result.query_path, title, color="tab:blue")
            titles.append(title)
            hits = result.hits[:shown]
            for rank, (hit, label) in enumerate(zip(hits, hit_labels(hits), strict=True)):
                ax = axes[row + rank // RESULTS_PER_ROW][1 + rank % RESULTS_PER_ROW]
                text = f"#{rank + 1}   score {hit.score:.3f}\n" + _wrapped(label, covered)
                _show(ax, hit.stored_path if hit.stored_path.exists() else Path(hit.path), text)
                titles.append(text)
            row += block
        fig.tight_layout()
        fig.savefig(out_path, dpi=100)
        plt.close(fig)
    return titles


def hit_labels(hits: tuple[Hit, ...] | list[Hit]) -> list[str]:
    """Each hit's path, shortened to its last parts, as many as make the labels distinct
    (a file name alone where that suffices)."""
    parts = [Path(h.path).parts for h in hits]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]).replace("//", "/", 1) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max((len(p) for p in parts), default=1):
            break
        depth += 1
    return [("…/" if len(p) > depth else "") + label
            for p, label in zip(parts, labels, strict=True)]  # fmt: skip


def renderable(text: str, covered: frozenset[int]) -> str:
    """`text` with each character no installed font can draw written as its code point."""
    return "".join(c if ord(c) in covered or c == "\n" else f"\\u{ord(c):04x}" for c in text)


def _wrapped(text: str, covered: frozenset[int]) -> str:
    return "\n".join(textwrap.wrap(renderable(text, covered), LABEL_WIDTH,
                                   break_long_words=True, break_on_hyphens=False)[:3])  # fmt: skip


@lru_cache(maxsize=1)
def _fonts() -> tuple[list[str], frozenset[int]]:
    """(font families to use, in order; the code points they can draw between them)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    installed = {f.name: f.fname for f in font_manager.fontManager.ttflist}
    families = ["DejaVu Sans", *[f for f in FALLBACK_FAMILIES if f in installed]]
    covered: set[int] = set()
    for family in families:
        path = installed.get(family) or font_manager.findfont(family, fallback_to_default=True)
        try:
            covered.update(FT2Font(path).get_charmap())
        except (OSError, RuntimeError):
            continue
    return families, frozenset(covered)


def _show(ax, path: Path, title: str, color: str = "black") -> None:  # noqa: ANN001
    try:
        ax.imshow(thumbnail(path, 256))
    except BadImage:
        ax.text(0.5, 0.5, "(missing)", ha="center", va="center")
    ax.set_title(title, color=color, fontsize=FONT_SIZE, loc="left")


MAP_COLOURS = 10  # the most frequent labels get a colour each, the rest are grey


def plot_map(
    points: npt.NDArray[np.float32],
    labels: list[str],
    thumbnails: list[tuple[int, Path]],
    out_path: Path,
    title: str,
) -> list[str]:
    """Save a scatter of `points` (n, 2) coloured by `labels` (n,), with thumbnails of the
    images at positions `thumbnails` ((point index, image path) pairs). Returns the legend's
    labels (the coloured ones, most frequent first, then "other")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    families, covered = _fonts()
    counts = Counter(labels)
    coloured = [label for label, _ in counts.most_common(MAP_COLOURS)]
    palette = plt.get_cmap("tab10")
    n = len(points)
    size = 14 if n < 1000 else 4 if n < 20_000 else 1
    legend = []
    with plt.rc_context({"font.family": families, "font.size": FONT_SIZE,
                         "text.parse_math": False}):
        fig, ax = plt.subplots(figsize=(12, 10))
        rest = np.array([label not in coloured for label in labels], bool)
        if rest.any():
            ax.scatter(points[rest, 0], points[rest, 1], s=size, c="#bbbbbb", linewidths=0,
                       label=f"other ({int(rest.sum())})")  # fmt: skip
        for k, label in enumerate(coloured):
            mine = np.array([x == label for x in labels], bool)
            ax.scatter(points[mine, 0], points[mine, 1], s=size, color=palette(k % 10),
                       linewidths=0, label=renderable(f"{label} ({counts[label]})", covered))
            legend.append(label)
        if rest.any():
            legend.append("other")
        for position, path in thumbnails:
            try:
                image = np.asarray(thumbnail(path, 64))
            except BadImage:
                continue
            box = AnnotationBbox(OffsetImage(image, zoom=0.6), tuple(points[position]),
                                 frameon=True, pad=0.1)  # fmt: skip
            ax.add_artist(box)
        ax.set_title(renderable(title, covered))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), markerscale=max(1, 8 / size),
                  frameon=False)  # fmt: skip
        fig.tight_layout()
        fig.savefig(out_path, dpi=100)
        plt.close(fig)
    return legend
