"""Figures of queries beside their best results, saved to a file (Agg backend, never shown)."""

from __future__ import annotations

from pathlib import Path

from cbir import categories
from cbir.images import open_display_image
from cbir.query import QueryResult


def plot_results(results: list[QueryResult], out_path: Path, n_results: int = 5) -> None:
    """One row per query: the query image, then its top `n_results` hits with scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = 1 + max(1, min(n_results, max((len(r.hits) for r in results), default=1)))
    fig, axes = plt.subplots(
        len(results), n_cols, figsize=(2.6 * n_cols, 2.9 * len(results)), squeeze=False
    )
    names = categories.names_by_wnid()
    for row, result in zip(axes, results, strict=True):
        for ax in row:
            ax.axis("off")
        top = result.categories[0] if result.categories else None
        title = f"query: {result.query_path.name}"
        if top is not None:
            title += f"\n{top.name} ({top.prob:.2f})"
        _show(row[0], result.query_path, title, color="tab:blue")
        for ax, hit in zip(row[1:], result.hits, strict=False):
            label = f"{hit.score:.3f}  {Path(hit.path).name}\n{names[hit.wnids[0]]}"
            _show(ax, hit.stored_path if hit.stored_path.exists() else Path(hit.path), label)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def _show(ax, path: Path, title: str, color: str = "black") -> None:  # noqa: ANN001
    try:
        ax.imshow(open_display_image(path, 256))
    except OSError:
        ax.text(0.5, 0.5, "(missing)", ha="center", va="center")
    ax.set_title(title, fontsize=8, color=color)
