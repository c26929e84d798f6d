"""Plots of evaluation results (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_verification(genuine: np.ndarray, impostor: np.ndarray, threshold: float, out: Path, title: str) -> None:
    """ROC (TAR against FAR, log scale) and genuine/impostor histograms with the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    thr = np.unique(np.concatenate([genuine, impostor]))[::-1]
    tar = np.searchsorted(np.sort(genuine), thr, side="left")
    tar = 1 - tar / len(genuine)
    far = 1 - np.searchsorted(np.sort(impostor), thr, side="left") / len(impostor)
    ax1.plot(np.maximum(far, 1e-5), tar)
    ax1.set_xscale("log")
    ax1.set_xlabel("false accept rate")
    ax1.set_ylabel("true accept rate")
    ax1.set_title("ROC")
    ax1.grid(True, which="both", alpha=0.3)
    bins = np.linspace(min(genuine.min(), impostor.min()), 1.0, 80)
    ax2.hist(impostor, bins=bins, alpha=0.6, label=f"impostor ({len(impostor)})", density=True)
    ax2.hist(genuine, bins=bins, alpha=0.6, label=f"genuine ({len(genuine)})", density=True)
    ax2.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3f}")
    ax2.set_xlabel("cosine similarity (higher = more alike)")
    ax2.legend()
    ax2.set_title("score distributions")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
