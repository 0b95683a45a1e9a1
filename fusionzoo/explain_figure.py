"""The PNG of an :class:`~fusionzoo.explain.Explanation`: the image under its heat map.

One panel for an answer or label; for a caption, a strip of small panels, one per word. The
title gives the question and answer (or the caption), the subtitle the method and the fusion,
so a figure says how its map was made.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .explain import Explanation  # noqa: E402
from .io import atomic_write  # noqa: E402

#: Caption words shown per row of the strip.
WORDS_PER_ROW = 6


def draw_explanation(explanation: Explanation, path: str | os.PathLike, alpha: float = 0.55) -> Path:
    """Write the figure of ``explanation`` to ``path`` (PNG), atomically; returns the path."""
    target = Path(path)
    with atomic_write(target, "wb", encoding=None) as handle:
        handle.write(explanation_png(explanation, alpha))
    return target


def explanation_png(explanation: Explanation, alpha: float = 0.55) -> bytes:
    """The figure of ``explanation`` as PNG bytes (what :func:`draw_explanation` writes)."""
    image = np.asarray(explanation.image.convert("RGB"))
    count = len(explanation.targets)
    columns = min(count, WORDS_PER_ROW)
    rows = -(-count // columns)
    size = 2.2 if count > 1 else 4.0
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows + 0.9), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= count:
            continue
        heat = explanation.heatmap(k)
        ax.imshow(image)
        ax.imshow(heat / max(float(heat.max()), 1e-12), cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        if count > 1:
            ax.set_title(explanation.targets[k], fontsize=10)
    if explanation.question is None:
        title = f"caption: {explanation.answer}"
    else:
        title = f"Q: {explanation.question}\nA: {explanation.answer}"
    fig.suptitle(f"{title}\n{explanation.method} ({explanation.fusion})", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
