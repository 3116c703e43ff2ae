"""Quality-control picture: checkerboard and overlay of fixed vs moving, before and after."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .image import Image  # noqa: E402


def _mid(img: Image) -> Tensor:
    d = img.data
    return d[d.shape[0] // 2] if d.dim() == 3 else d


def _norm(x: Tensor) -> Tensor:
    lo, hi = torch.quantile(x.float().reshape(-1), 0.01), torch.quantile(x.float().reshape(-1), 0.99)
    return ((x - lo) / max(float(hi - lo), 1e-12)).clamp(0, 1)


def checkerboard(a: Tensor, b: Tensor, tiles: int = 8) -> Tensor:
    h, w = a.shape
    yy = torch.arange(h)[:, None] * tiles // max(h, 1)
    xx = torch.arange(w)[None, :] * tiles // max(w, 1)
    return torch.where((yy + xx) % 2 == 0, a, b)


def save_qc(fixed: Image | None, before: Image, after: Image, path: str | os.PathLike) -> None:
    """Write a 2x2 PNG: checkerboard and red/green overlay, before and after (mid slice in 3D).

    Without the fixed image (party 1 of a private run) it shows the moving image on the fixed
    grid before and after registration, side by side.
    """
    if fixed is None:
        fig, ax = plt.subplots(1, 2, figsize=(8, 4))
        for x, img, title in ((ax[0], before, "moving before"), (ax[1], after, "moving after (on the fixed grid)")):
            x.imshow(_norm(_mid(img)).numpy(), cmap="gray")
            x.set_title(title)
            x.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return
    f, b, a = _norm(_mid(fixed)), _norm(_mid(before)), _norm(_mid(after))
    fig, ax = plt.subplots(2, 2, figsize=(8, 8))
    for col, (img, title) in enumerate(((b, "before"), (a, "after"))):
        ax[0, col].imshow(checkerboard(f, img).numpy(), cmap="gray")
        ax[0, col].set_title(f"checkerboard {title}")
        rgb = torch.stack([f, img, torch.zeros_like(f)], -1)
        ax[1, col].imshow(rgb.numpy())
        ax[1, col].set_title(f"overlay {title} (red fixed, green moving)")
    for x in ax.flat:
        x.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
