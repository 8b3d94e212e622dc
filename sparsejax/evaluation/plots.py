"""Figures of the evaluation report."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def retrieval_heatmap(retrieval: dict, path: str, title: str = "") -> None:
    """One heatmap per task (depth on y, context length on x, accuracy as colour) saved as a PNG."""
    tasks = list(retrieval)
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        r = retrieval[task]
        acc = np.asarray(r["accuracy"], dtype=float).T  # [depths, lengths]
        im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(r["context_lengths"])), [str(x) for x in r["context_lengths"]])
        ax.set_yticks(range(len(r["depths"])), [f"{d:.2f}" for d in r["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("passkey depth" if task == "passkey" else "needle depth")
        ax.set_title(f"{task} accuracy")
        for (i, j), value in np.ndenumerate(acc):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
