"""Pictures a user looks at: training curves and image grids (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def plot_curves(rows: list[dict], keys: Sequence[str], png_path: str | Path, smooth: int = 0) -> None:
    """One panel per metric against the step, raw and (when long enough) a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    window = smooth or max(1, len(rows) // 20)
    for ax, key in zip(axes[0], keys):
        steps = [r["step"] for r in rows if key in r]
        values = [r[key] for r in rows if key in r]
        ax.plot(steps, values, alpha=0.35, label=key)
        if window > 1 and len(values) > window:
            kernel = torch.ones(window) / window
            smoothed = torch.nn.functional.conv1d(torch.tensor(values).view(1, 1, -1), kernel.view(1, 1, -1)).view(-1)
            ax.plot(steps[window - 1 :], smoothed.tolist(), label=f"{key} (mean of {window})")
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def save_image_grid(
    rows: Sequence[Sequence[torch.Tensor]],
    png_path: str | Path,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    cell: float = 1.6,
) -> None:
    """rows[i][j]: a (3, H, W) image in [0, 1]. Labels on the left and on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols + 1.2, cell * n_rows + 0.6), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            if i == 0 and col_labels is not None and j < len(col_labels):
                ax.set_title(_wrap(col_labels[j]), fontsize=7)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i], fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _wrap(text: str, width: int = 22) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width and line:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines[:3])
