"""Attention heat maps, drawn off-screen with matplotlib's Agg canvas.

No pyplot and no global backend switch: importing this module never changes how the caller's own
matplotlib figures are shown, and it works on machines without a display.
"""
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_attention(weights, src_tokens: Sequence[str], out_tokens: Sequence[str], path: str,
                   title: str | None = None, dpi: int = 100) -> None:
    """Writes a heat map of `weights` [T, S] to `path` (format from the suffix, e.g. .png).

    Row t holds the attention over the S source tokens (x axis) while the decoder emitted output
    token t (y axis, top to bottom); a colour bar gives the scale from 0 to 1.
    """
    weights = np.asarray(weights, np.float32)
    if weights.shape != (len(out_tokens), len(src_tokens)):
        raise ValueError(f"weights have shape {weights.shape}, but there are {len(out_tokens)} output "
                         f"and {len(src_tokens)} source tokens ([T, S] expected)")
    cell = 0.3  # inches per token
    fig = Figure(figsize=(max(4.0, cell * len(src_tokens) + 2.5), max(3.0, cell * len(out_tokens) + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(src_tokens)), labels=list(src_tokens), rotation=90)
    ax.set_yticks(range(len(out_tokens)), labels=list(out_tokens))
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
