"""FID features: pytorch-fid's Inception-v3 (the TF FID network), weights from a local file.

pytorch-fid builds its network in ``pytorch_fid.inception.fid_inception_v3``, which calls
``load_state_dict_from_url(FID_WEIGHTS_URL)`` and so downloads on first use. We build the
very same ``InceptionV3`` module (same class, same forward: bilinear resize to 299x299,
``2x - 1``, pool3 features) but route that one call to a state dict we load ourselves from
a local file, for the duration of the construction: no download is ever attempted.

Weights: ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's port of the TF
``inception-2015-12-05`` graph used by every published FID), found at, in order: the
``weights_path`` argument (CLI ``--inception-weights``), the ``AMBIENT_FAST_INCEPTION_WEIGHTS``
environment variable, torch hub's checkpoint folder (where pytorch-fid caches it).

Input convention: float images in [-1, 1] ``(B, C, H, W)``, ``C`` 1 or 3 (grayscale is
repeated to RGB like PIL's ``convert("RGB")``), or ``uint8`` in [0, 255]. Floats are first
quantised to 8 bits exactly as EDM writes its PNGs (``floor(clip(127.5 x + 128, 0, 255))``),
so streaming a sampler's output gives the FID of the PNGs it would have written.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import pytorch_fid.inception
import torch
from pytorch_fid.inception import InceptionV3
from torch import nn

from .stats import FeatureExtractor, GaussianStats, feature_statistics, load_stats

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_NAME",
    "InceptionFeatures",
    "fid_from_batches",
    "inception_feature_extractor",
    "resolve_inception_weights",
]

INCEPTION_WEIGHTS_ENV = "AMBIENT_FAST_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
_INCEPTION_SHA256_PREFIX = "6726825d"  # torch hub convention: hash prefix in the file name
_POOL3_BLOCK = InceptionV3.BLOCK_INDEX_BY_DIM[2048]


def _missing_weights_message(searched: list[str]) -> str:
    return (
        "FID needs pytorch-fid's Inception weights, which are never downloaded at run time.\n"
        f"Searched: {', '.join(searched)}.\n"
        "To obtain them, on a machine with internet access run\n"
        f"    curl -L -o {INCEPTION_WEIGHTS_NAME} {pytorch_fid.inception.FID_WEIGHTS_URL}\n"
        "(about 91 MiB; sha256 starts with 6726825d), copy the file here, and pass\n"
        f"--inception-weights PATH (or set {INCEPTION_WEIGHTS_ENV}=PATH), or put it in\n"
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}."
    )


def resolve_inception_weights(weights_path: str | os.PathLike[str] | None = None) -> Path:
    """Locate the Inception weights file (see the module docstring for the search order).

    Raises:
        FileNotFoundError: with instructions on how to obtain the file.
    """
    if weights_path is not None:
        candidates = [("weights_path argument", Path(weights_path))]
    else:
        candidates = []
        if os.environ.get(INCEPTION_WEIGHTS_ENV):
            candidates.append((f"${INCEPTION_WEIGHTS_ENV}", Path(os.environ[INCEPTION_WEIGHTS_ENV])))
        hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME
        candidates.append(("torch hub cache", hub))
    for _, path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(_missing_weights_message([f"{path} ({what})" for what, path in candidates]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class InceptionFeatures(nn.Module):
    """pytorch-fid's ``InceptionV3`` pool3 features with the module's input convention.

    Args:
        state_dict: weights of pytorch-fid's ``fid_inception_v3`` backbone (the contents of
            ``pt_inception-2015-12-05-6726825d.pth``, or any tensors of the same shapes).
        fingerprint: names the weights in statistics fingerprints.
        quantize: quantise float inputs to 8 bits first (see the module docstring).

    ``forward(images)``: ``(B, 1 or 3, H, W)`` float in [-1, 1] or uint8 -> ``(B, 2048)``
    float32 features, computed in float32.
    """

    dims = 2048

    def __init__(self, state_dict: Mapping[str, torch.Tensor], fingerprint: str, quantize: bool = True) -> None:
        super().__init__()

        def local_weights(url: str, *args: Any, **kwargs: Any) -> Mapping[str, torch.Tensor]:
            return state_dict

        if not hasattr(pytorch_fid.inception, "load_state_dict_from_url"):
            raise RuntimeError(
                "this pytorch-fid version no longer fetches weights through "
                "pytorch_fid.inception.load_state_dict_from_url; ambient_fast cannot build "
                "its network without a download"
            )
        # fid_inception_v3() fetches its weights through this module-level function: point it
        # at our state dict while the network is built (not thread-safe: build one at a time).
        with mock.patch.object(pytorch_fid.inception, "load_state_dict_from_url", local_weights):
            self.inception = InceptionV3([_POOL3_BLOCK], resize_input=True, normalize_input=True)
        self.train(False)
        self.quantize = quantize
        self.fingerprint = f"pytorch-fid-inception-v3-pool3/{fingerprint}/" + ("uint8" if quantize else "float")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, 1 or 3, H, W), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.float() / 255
        elif self.quantize:
            x = torch.floor((images.float() * 127.5 + 128).clamp(0, 255)) / 255
        else:
            x = (images.float() + 1) / 2
        x = x.expand(-1, 3, -1, -1)
        return self.inception(x)[0].flatten(1)

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Always in inference mode (batch-norm statistics are fixed weights)."""
        return super().train(False)


def inception_feature_extractor(
    weights_path: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    *,
    quantize: bool = True,
) -> InceptionFeatures:
    """The FID feature network with the weights from a local file (never downloads).

    Args:
        weights_path: ``pt_inception-2015-12-05-6726825d.pth``; ``None`` searches
            ``$AMBIENT_FAST_INCEPTION_WEIGHTS`` then torch hub's cache.
        device: default CUDA when available, else CPU.
        quantize: see :class:`InceptionFeatures`.

    Raises:
        FileNotFoundError: weights not found, with instructions to obtain them.
    """
    path = resolve_inception_weights(weights_path)
    digest = _sha256(path)
    if not digest.startswith(_INCEPTION_SHA256_PREFIX):
        warnings.warn(
            f"{path} is not pytorch-fid's {INCEPTION_WEIGHTS_NAME} (sha256 {digest[:16]}...): "
            "FID values will not be comparable with published ones",
            stacklevel=2,
        )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    extractor = InceptionFeatures(state_dict, f"sha256:{digest[:16]}", quantize=quantize)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return extractor.to(device).requires_grad_(False)


def fid_from_batches(
    batches: Iterable[Any],
    reference: GaussianStats | str | os.PathLike[str] | torch.Tensor,
    *,
    extractor: FeatureExtractor | None = None,
    weights_path: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    max_images: int | None = None,
    batch_size: int = 250,
) -> float:
    """FID of streamed images against reference statistics.

    Args:
        batches: image batches ``(B, C, H, W)`` in [-1, 1] (or uint8, or ``(images, ...)``
            tuples), e.g. straight from a sampler; consumed lazily up to ``max_images``.
        reference: :class:`GaussianStats`, an ``.npz`` path (ours, pytorch-fid's or EDM's
            ``mu``/``sigma`` files; EDM's are from its own Inception port, so expect small
            differences against those), or reference images ``(M, C, H, W)`` (their
            statistics are computed here; cache them with ``cached_reference_stats``).
        extractor: a built :class:`InceptionFeatures` (reuse it across calls; any
            :class:`~ambient_fast.eval.stats.FeatureExtractor` works); default:
            :func:`inception_feature_extractor` ``(weights_path, device)``.
        max_images: number of images to use (50,000 for the standard FID-50k).
        batch_size: Inception batch size.

    Raises:
        ValueError: the reference statistics carry another extractor's fingerprint.
    """
    if extractor is None:
        extractor = inception_feature_extractor(weights_path, device)
    if isinstance(reference, torch.Tensor):
        reference = feature_statistics([reference], extractor, batch_size=batch_size)
    elif not isinstance(reference, GaussianStats):
        reference = load_stats(reference)
    stats = feature_statistics(batches, extractor, max_images=max_images, batch_size=batch_size)
    return stats.frechet_distance(reference)
