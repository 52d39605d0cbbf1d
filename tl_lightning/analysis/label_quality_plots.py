"""Pictures of a label-quality scan, so a person can look rather than read.

* :func:`contact_sheet`: the top flagged images, titled ``given -> suggested``;
* :func:`markdown_sheet`: the same for texts, as a Markdown table;
* :func:`noise_heatmap`: the estimated noise matrix (given vs likely true class) with its summary;
* :func:`feature_map`: a 2-D t-SNE (scikit-learn) of the frozen features, coloured by given label,
  flagged examples marked, to see whether the classes separate before any fine-tuning.

Needs matplotlib (``pip install 'tl-lightning[quality]'``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "the label-quality figures need matplotlib: pip install 'tl-lightning[quality]'"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def contact_sheet(
    images: Sequence[torch.Tensor], titles: Sequence[str], path: str | Path, columns: int = 8
) -> Path:
    """A grid of ``(3, H, W)`` images in ``[0, 1]``, each with its title, written as a PNG.

    Raises:
        ValueError: If ``images`` is empty or ``titles`` has another length.
    """
    if not images or len(images) != len(titles):
        raise ValueError(
            f"need one title per image and at least one image, got {len(images)} and {len(titles)}"
        )
    plt = _pyplot()
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, title in zip(axes.flat, images, titles, strict=False):
        axis.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        axis.set_title(title, fontsize=7)
    figure.tight_layout()
    return _save(figure, path, plt)


def markdown_sheet(
    texts: Sequence[str], given: Sequence[str], suggested: Sequence[str], scores, index
) -> str:
    """The top flagged texts as a Markdown table (``|`` escaped, newlines folded)."""
    lines = ["| index | text | given | suggested | score |", "|---|---|---|---|---|"]
    for i, text, g, s, score in zip(index, texts, given, suggested, scores, strict=True):
        cell = " ".join(text.split()).replace("|", "\\|")
        lines.append(f"| {i} | {cell} | {g} | {s} | {score:.3f} |")
    return "\n".join(lines) + "\n"


def noise_heatmap(joint: np.ndarray, class_names: Sequence[str], summary: str, path: str | Path) -> Path:
    """The estimated counts of (given, likely true) label pairs as an annotated heat map."""
    plt = _pyplot()
    size = max(4.0, 0.55 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    image = axis.imshow(joint, cmap="viridis")
    figure.colorbar(image, ax=axis, shrink=0.8, label="estimated examples")
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(ticks, class_names, fontsize=8)
    axis.set_xlabel("likely true class")
    axis.set_ylabel("given label")
    for i in ticks:
        for j in ticks:
            axis.text(j, i, f"{joint[i, j]:.0f}", ha="center", va="center", fontsize=6, color="white")
    axis.set_title("\n".join(textwrap.wrap(summary, 70)), fontsize=7)
    figure.tight_layout()
    return _save(figure, path, plt)


def feature_map(
    features: torch.Tensor,
    given: np.ndarray,
    flagged: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    seed: int = 0,
) -> Path:
    """t-SNE of ``features`` (after PCA to at most 50 dimensions), coloured by given label, flagged marked."""
    plt = _pyplot()
    x = features.double().numpy()
    x = PCA(min(50, *x.shape), random_state=seed).fit_transform(x)
    perplexity = min(30.0, (len(x) - 1) / 3)
    points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    figure, axis = plt.subplots(figsize=(7, 6))
    colours = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for cls, name in enumerate(class_names):
        members = given == cls
        axis.scatter(*points[members].T, s=6, color=colours(cls % colours.N), label=name, alpha=0.7)
    axis.scatter(
        *points[flagged].T, s=28, facecolors="none", edgecolors="black", linewidths=0.8, label="flagged"
    )
    axis.legend(fontsize=7, markerscale=2, loc="best", ncol=2)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(f"t-SNE of the frozen features ({len(x)} training examples, {int(flagged.sum())} flagged)")
    figure.tight_layout()
    return _save(figure, path, plt)


def _save(figure, path: str | Path, plt) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
