"""``report.png`` of a loop run: the model's metric per loop (and the restored data's, when
scored against clean versions), loss curves, sigma_min before/after restoration, and a grid
of corrupt / restored / clean samples (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["image_grid", "plot_report"]


def image_grid(rows: Sequence[torch.Tensor], pad: int = 1) -> torch.Tensor:
    """Tile rows of images ``(n, C, H, W)`` in [-1, 1] into one ``(H', W', C)`` array in [0, 1].

    Rows may have different lengths; missing cells stay white.
    """
    rows = [r.detach().float().cpu() for r in rows if r is not None and len(r)]
    if not rows:
        return torch.ones(1, 1, 3)
    c, h, w = rows[0].shape[1:]
    cols = max(len(r) for r in rows)
    canvas = torch.ones(c, len(rows) * (h + pad) + pad, cols * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, y : y + h, x : x + w] = (img.clamp(-1, 1) + 1) / 2
    out = canvas.permute(1, 2, 0)
    return out.expand(-1, -1, 3) if c == 1 else out


def plot_report(
    path: str | Path,
    *,
    metric_name: str,
    loops: list[dict[str, Any]],
    loss_curves: dict[str, list[tuple[int, float]]],
    sigma_min_before: torch.Tensor | None = None,
    sigma_min_after: dict[str, torch.Tensor] | None = None,
    grid_rows: dict[str, torch.Tensor] | None = None,
    best_loop: int | None = None,
    title: str = "",
) -> Path:
    """Write the four-panel report.

    Args:
        path: output PNG.
        metric_name: y label of the metric panel.
        loops: one dict per loop with ``"loop"`` and ``"value"`` (and optionally
            ``"memorisation"``, and ``"data_value"``: the restored data's metric).
        loss_curves: ``{label: [(images, loss), ...]}``.
        sigma_min_before: ``(N,)`` annotation of the original data.
        sigma_min_after: ``{label: (N,)}`` annotations of the restored versions.
        grid_rows: ``{row label: (n, C, H, W)}`` images in [-1, 1], e.g. corrupt, restored, clean.
        best_loop: highlighted in the metric panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    xs = [r["loop"] for r in loops if r.get("value") is not None]
    ys = [r["value"] for r in loops if r.get("value") is not None]
    ax.plot(xs, ys, "o-", color="C0", label="model")
    restored = [(r["loop"], r["data_value"]) for r in loops if r.get("data_value") is not None]
    if restored:
        ax.plot(*zip(*restored, strict=True), "s--", color="C1", label="restored data")
    if best_loop is not None and best_loop in xs:
        ax.plot([best_loop], [ys[xs.index(best_loop)]], "*", ms=16, color="C3", label=f"best: loop {best_loop}")
    if xs:
        ax.legend()
    ax.set_xlabel("loop")
    ax.set_ylabel(metric_name)
    ax.set_title(f"{metric_name} per loop (lower is better)")
    if xs:
        ax.set_xticks(xs)

    ax = axes[0, 1]
    for label, curve in loss_curves.items():
        if curve:
            imgs, vals = zip(*curve, strict=True)
            ax.plot(imgs, vals, label=label, lw=1)
    ax.set_xlabel("training images")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("training loss")
    if loss_curves:
        ax.legend(fontsize=8)

    ax = axes[1, 0]
    series = []
    if sigma_min_before is not None:
        series.append(("original", sigma_min_before))
    series += list((sigma_min_after or {}).items())
    positive = [s[s > 0].double() for _, s in series]
    if any(len(p) for p in positive):
        lo = min(float(p.min()) for p in positive if len(p))
        hi = max(float(p.max()) for p in positive if len(p))
        bins = torch.logspace(torch.log10(torch.tensor(lo * 0.9)), torch.log10(torch.tensor(hi * 1.1)), 40).numpy()
        for (label, s), p in zip(series, positive, strict=True):
            clean = int((s == 0).sum())
            ax.hist(p.numpy(), bins=bins, alpha=0.6, label=f"{label} ({clean} clean)")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("sigma_min of corrupt samples")
    ax.set_ylabel("samples")
    ax.set_title("sigma_min before / after restoration")

    ax = axes[1, 1]
    rows = list((grid_rows or {}).items())
    if rows:
        grid = image_grid([r for _, r in rows])
        ax.imshow(grid.numpy(), interpolation="nearest")
        h = rows[0][1].shape[-2] + 1
        ax.set_yticks([1 + h * i + h / 2 for i in range(len(rows))])
        ax.set_yticklabels([label for label, _ in rows])
        ax.set_xticks([])
    else:
        ax.axis("off")
    ax.set_title("samples")

    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
