"""``FD_digits``: a Frechet distance in the features of a small classifier of 8x8 digits.

For the bundled digits demo (scikit-learn's ``load_digits``: 1,797 grayscale 8x8 images
with 17 grey levels, 10 classes) Inception features are meaningless, so distributions are
compared in the 64-dim penultimate features of :class:`DigitsFeatureNet`, a 38k-parameter
CNN trained on the clean digits. Report it as ``FD_digits``, never as FID.

The trained weights ship with the package (``ambient_fast/assets/digits_featnet.safetensors``,
150 KB) rather than being trained on first use: training is seeded and takes under a
minute on two CPU cores, but CPU kernels are not bit-reproducible across machines, thread
counts and torch versions, and an ``FD_digits`` is only comparable with another one
computed with the *same* weights. The
file's sha256 is part of the statistics fingerprint. Regenerate it (same recipe, seed 0)
with ``python -m ambient_fast.eval.digits``.

Input convention everywhere: images in [-1, 1] (``load_digits`` value ``v`` in 0..16 maps to
``v / 8 - 1``), shaped ``(B, 1, 8, 8)``, ``(B, 64)``, or ``(B, 1, 16, 16)`` (2x2
average-pooled to 8x8).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .stats import GaussianStats, feature_statistics

__all__ = [
    "DIGITS_ASSET",
    "DigitsFeatureNet",
    "digits_feature_extractor",
    "fd_digits",
    "load_digits_images",
    "train_digits_feature_net",
]

DIGITS_ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits_featnet.safetensors"

# Training recipe of the shipped weights (train_digits_feature_net defaults).
_HELDOUT = 297  # digits kept out of training to report accuracy (1,500 train)
_EPOCHS = 40
_BATCH = 50
_LR = 2e-3


@cache
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).div(8).sub(1).unsqueeze(1)
    return images, torch.tensor(data.target, dtype=torch.int64)


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits: images ``(1797, 1, 8, 8)`` float32 in [-1, 1] and
    labels ``(1797,)`` int64 in 0..9 (fresh copies)."""
    images, labels = _digits_arrays()
    return images.clone(), labels.clone()


def _as_8x8(images: torch.Tensor) -> torch.Tensor:
    if images.dim() == 2 and images.shape[1] == 64:
        return images.reshape(-1, 1, 8, 8)
    if images.dim() == 4 and images.shape[1] == 1 and tuple(images.shape[2:]) == (16, 16):
        return F.avg_pool2d(images, 2)
    if images.dim() == 4 and tuple(images.shape[1:]) == (1, 8, 8):
        return images
    raise ValueError(f"digits must be (B, 1, 8, 8), (B, 64) or (B, 1, 16, 16), got {tuple(images.shape)}")


class DigitsFeatureNet(nn.Module):
    """Small CNN classifier of 8x8 digits whose penultimate layer defines ``FD_digits``.

    ``conv3x3(1->16) SiLU conv3x3(16->32) SiLU avgpool2 -> 512 -> linear(64) SiLU`` gives
    the features; ``linear(64->10)`` the class logits. 38,282 parameters.

    ``forward(images)``: see the module's input convention -> ``(B, 64)`` float32 features.
    """

    dims = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, self.dims)
        self.head = nn.Linear(self.dims, 10)
        self.fingerprint = "digits-featnet/untrained"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _as_8x8(images).to(self.conv1.weight.dtype)
        x = F.silu(self.conv2(F.silu(self.conv1(x))))
        return F.silu(self.fc(F.avg_pool2d(x, 2).flatten(1)))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, 10)``."""
        return self.head(self(images))


def train_digits_feature_net(seed: int = 0, epochs: int = _EPOCHS) -> tuple[DigitsFeatureNet, float]:
    """Train :class:`DigitsFeatureNet` on the clean digits (seeded; CPU, under a minute).

    A seeded split keeps 297 digits out; the rest train with Adam (lr 2e-3, batch 50) and
    cross-entropy. The global RNG state is left untouched.

    Returns:
        ``(net, heldout_accuracy)``, the net in eval mode.
    """
    images, labels = _digits_arrays()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        order = torch.randperm(images.shape[0])
        train_idx, heldout_idx = order[_HELDOUT:], order[:_HELDOUT]
        net = DigitsFeatureNet()
        optimizer = torch.optim.Adam(net.parameters(), lr=_LR)
        for _ in range(epochs):
            for idx in train_idx[torch.randperm(train_idx.numel())].split(_BATCH):
                loss = F.cross_entropy(net.logits(images[idx]), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    net.eval()
    with torch.no_grad():
        predicted = net.logits(images[heldout_idx]).argmax(1)
    return net, float((predicted == labels[heldout_idx]).float().mean())


@cache
def _asset_sha256() -> str:
    return hashlib.sha256(DIGITS_ASSET.read_bytes()).hexdigest()


def digits_feature_extractor(device: torch.device | str = "cpu") -> DigitsFeatureNet:
    """The shipped, trained :class:`DigitsFeatureNet` in eval mode without gradients;
    ``fingerprint`` names its weights' sha256."""
    if not DIGITS_ASSET.is_file():
        raise FileNotFoundError(f"{DIGITS_ASSET} is missing; regenerate it with `python -m ambient_fast.eval.digits`")
    net = DigitsFeatureNet()
    net.load_state_dict(load_file(DIGITS_ASSET))
    net.fingerprint = f"digits-featnet/sha256:{_asset_sha256()[:16]}"
    return net.eval().requires_grad_(False).to(device)


def fd_digits(
    samples: torch.Tensor | Iterable[Any],
    reference: torch.Tensor | GaussianStats | None = None,
    *,
    extractor: DigitsFeatureNet | None = None,
) -> float:
    """``FD_digits``: Frechet distance between ``samples`` and ``reference`` in
    :class:`DigitsFeatureNet` features (squared feature units; 0 = identical statistics).

    Args:
        samples: images (module input convention) as one tensor or an iterable of batches.
        reference: images, precomputed :class:`GaussianStats`, or ``None`` for all 1,797
            clean digits.
        extractor: default :func:`digits_feature_extractor`.

    Scale, with the shipped weights (898 perturbed digits against the 899 others, mean of
    3 random splits): clean 14.5 (the finite-sample floor; the spread between splits is
    about +-4), Gaussian noise of std 0.2 14.2 (undetectable), std 0.4 27, std 0.8 172,
    a 3x3 box blur 489, a 1-pixel shift 474; uniform noise in [-1, 1] about 1,800. Use the
    same sample count when comparing values.
    """
    extractor = extractor or digits_feature_extractor()
    if reference is None:
        reference = _digits_arrays()[0]
    if isinstance(reference, torch.Tensor):
        reference = feature_statistics([reference], extractor, source="digits-reference")
    if isinstance(samples, torch.Tensor):
        samples = [samples]
    stats = feature_statistics(samples, extractor, source="digits-samples")
    return stats.frechet_distance(reference)


if __name__ == "__main__":
    trained, accuracy = train_digits_feature_net()
    DIGITS_ASSET.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in trained.state_dict().items()},
        DIGITS_ASSET,
        metadata={"recipe": "train_digits_feature_net(seed=0)", "heldout_accuracy": f"{accuracy:.4f}"},
    )
    print(f"wrote {DIGITS_ASSET} (held-out accuracy {accuracy:.4f})")
