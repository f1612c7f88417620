"""The restorer users switch from, written fresh as a plain loop (ANCHORS 3.2).

What Ambient Dataloops' ``restore.py`` does, per image, at its defaults: batch 1, float64
sampler state, a per-image rho-7 grid of 18 levels from the image's sigma_min down to 0.002,
then 0; deterministic Heun (35 network evaluations); read the PNG, restore, write the PNG and
its annotation line ``sigma_min / rho_ambient``. Images with sigma_min = 0 are copied.

One deliberate deviation so the outputs can be compared with ours sample by sample: the
start noise of image i is :func:`ambient_fast.core.noise.sample_normal` on the seed derived
from ``(seed, i)`` (what ``restore_dataset`` uses), instead of the anchors'
``StackedRandomGenerator`` normal draws; both are standard normal, and the cost is the same.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ambient_fast.core.noise import STREAM_RESTORE, derive_seeds, sample_normal

__all__ = ["anchor_restore_image", "anchor_restore_folder"]


@torch.no_grad()
def anchor_restore_image(
    net,
    image: torch.Tensor,
    sigma_start: float,
    latents: torch.Tensor,
    *,
    num_steps: int = 18,
    sigma_floor: float = 0.002,
    rho: float = 7.0,
) -> torch.Tensor:
    """Restore one image ``(C, H, W)`` float64 in [-1, 1] from ``sigma_start`` to 0 (Heun)."""
    # Per-image time step discretization (EDM eq. 5), then t_N = 0.
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    hi, lo = max(sigma_start, sigma_floor), sigma_floor
    t_steps = (hi ** (1 / rho) + step_indices / (num_steps - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    # Fresh noise at the image's level.
    x_next = image[None].to(torch.float64) + latents[None].to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        x_cur = x_next
        # Euler step.
        denoised = net(x_cur, t_cur.reshape(1)).to(torch.float64)
        d_cur = (x_cur - denoised) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        # Apply 2nd order correction.
        if i < num_steps - 1:
            denoised = net(x_next, t_next.reshape(1)).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next[0]


def anchor_restore_folder(
    net,
    src: Path,
    dst: Path,
    *,
    num_steps: int = 18,
    seed: int = 0,
    rho_ambient: float = 8.0,
    limit: int | None = None,
) -> dict[str, float]:
    """Restore the first ``limit`` corrupt images of an EDM folder one at a time.

    Returns timing: ``{"images": n, "seconds": s, "images_per_second": n / s}``.
    """
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    levels = {
        e["filename"]: e["sigma_min"] for e in map(json.loads, (src / "annotations.jsonl").read_text().splitlines())
    }
    todo = [(i, n) for i, n in enumerate(names) if levels[n] > 0][:limit]
    device = next(net.parameters()).device
    lines = []
    start = time.perf_counter()
    for index, name in todo:
        pixels = np.asarray(Image.open(src / name), dtype=np.uint8)
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        image = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).to(device, torch.float64) / 127.5 - 1
        seeds = derive_seeds(torch.tensor([index]), seed)
        latents = sample_normal(seeds, tuple(image.shape), stream=STREAM_RESTORE, dtype=torch.float64)[0].to(device)
        restored = anchor_restore_image(net, image, levels[name], latents, num_steps=num_steps)
        out = (restored * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out[:, :, 0] if out.shape[2] == 1 else out).save(dst / name)
        lines.append(json.dumps({"filename": name, "sigma_min": levels[name] / rho_ambient, "sigma_max": 0.0}))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    (dst / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return {"images": len(todo), "seconds": seconds, "images_per_second": len(todo) / seconds}
