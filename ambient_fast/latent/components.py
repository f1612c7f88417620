"""Load the parts of a local diffusers text-to-image pipeline folder, offline.

A pipeline folder (what ``DiffusionPipeline.save_pretrained`` writes) has ``model_index.json``
naming each component's library and class, and one subfolder per component: ``unet`` or
``transformer``, ``vae``, ``scheduler``, ``text_encoder`` and ``tokenizer`` (SDXL also
``text_encoder_2`` and ``tokenizer_2``). Each part is loaded with its own class's
``from_pretrained(subfolder, local_files_only=True)``; nothing is downloaded.

Dtype policy: bf16 on GPU, fp32 on CPU, for the denoiser, the VAE and the text encoders
alike (the conditioning then already has the denoiser's dtype). The sampler state stays
float32/float64 (the engine's ``--state-dtype``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .adapter import DiffusersDenoiser
from .conditioning import CaptionEncoder
from .guidance import ConditionedDenoiser
from .vae import LatentCodec

__all__ = ["LatentComponents", "default_dtype", "load_components"]

_PIXART_TEXT_LENGTH = {"PixArtSigmaPipeline": 300}  # pipelines' max_sequence_length; PixArt-alpha: 120
_PIXART_DEFAULT_TEXT_LENGTH = 120


@dataclass
class LatentComponents:
    """What latent restoration needs: a conditional EDM denoiser, a VAE, a caption encoder."""

    denoiser: ConditionedDenoiser
    codec: LatentCodec
    caption_encoder: CaptionEncoder
    source: str | None = None  # the pipeline folder they were loaded from, if any

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary (for run records)."""
        record: dict[str, Any] = {
            "source": self.source,
            "denoiser": type(self.denoiser).__name__,
            "vae_scaling_factor": self.codec.scaling_factor,
            "vae_shift_factor": self.codec.shift_factor,
            "text_layout": self.caption_encoder.layout,
            "text_max_length": self.caption_encoder.max_length,
            "negative_caption": self.caption_encoder.negative_caption,
            "zero_unconditional": self.caption_encoder.zero_unconditional,
        }
        if isinstance(self.denoiser, DiffusersDenoiser):
            record.update(
                model=type(self.denoiser.model).__name__,
                prediction_type=self.denoiser.prediction_type,
                timestep_mapping=self.denoiser.timestep_mapping,
                model_sigma_range=[self.denoiser.sigma_min, self.denoiser.sigma_max],
            )
        return record


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (the encoders' and denoiser's compute dtype)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _load_part(root: Path, index: dict[str, Any], name: str, device: torch.device, dtype: torch.dtype) -> Any:
    entry = index.get(name)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        raise ValueError(f"{root / 'model_index.json'}: no component {name!r}")
    library_name, class_name = entry
    if library_name not in ("diffusers", "transformers"):
        raise ValueError(f"{root}: component {name!r} comes from {library_name!r}; only diffusers/transformers load")
    library = __import__(library_name)
    cls = getattr(library, class_name, None)
    if cls is None:
        raise ValueError(f"{root}: {library_name} has no class {class_name!r} (component {name!r})")
    folder = root / name
    if "Tokenizer" in class_name or "Scheduler" in class_name:
        return cls.from_pretrained(folder, local_files_only=True)
    part = cls.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    return part.to(device).eval().requires_grad_(False)


def load_components(
    model_dir: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    timestep_mapping: Literal["interpolated", "nearest"] = "interpolated",
    text_max_length: int | None = None,
    negative_caption: str = "",
    text_batch_size: int = 64,
    vae_batch_size: int = 16,
) -> LatentComponents:
    """Load a local diffusers pipeline folder into :class:`LatentComponents` (no downloads).

    Args:
        model_dir: the pipeline folder (``model_index.json`` + component subfolders).
        device: where everything runs.
        dtype: compute dtype (default :func:`default_dtype`: bf16 on GPU, fp32 on CPU).
        timestep_mapping: the adapter's sigma -> timestep map (:mod:`~ambient_fast.latent.adapter`).
        text_max_length: token length (default: tokenizer's, 120/300 for PixArt alpha/sigma).
        negative_caption: caption of the unconditional rows.
        text_batch_size, vae_batch_size: encoder batch sizes.

    The text layout follows the folder: ``text_encoder_2`` -> ``"sdxl"``; a ``transformer``
    with ``caption_channels`` (PixArt) -> ``"pixart"``; otherwise ``"single"``.
    """
    root = Path(model_dir)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{root}: not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_path.read_text("utf-8"))
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    network_name = "unet" if "unet" in index else "transformer"
    network = _load_part(root, index, network_name, device, dtype)
    scheduler = _load_part(root, index, "scheduler", device, dtype)
    vae = _load_part(root, index, "vae", device, dtype)
    if "text_encoder_2" in index and index["text_encoder_2"][1] is not None:
        layout = "sdxl"
        names = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
    else:
        layout = "pixart" if getattr(network.config, "caption_channels", None) else "single"
        names = [("tokenizer", "text_encoder")]
    tokenizers = [_load_part(root, index, tok, device, dtype) for tok, _ in names]
    encoders = [_load_part(root, index, enc, device, dtype) for _, enc in names]
    if layout == "pixart" and text_max_length is None:
        text_max_length = _PIXART_TEXT_LENGTH.get(index.get("_class_name", ""), _PIXART_DEFAULT_TEXT_LENGTH)
    caption_encoder = CaptionEncoder(
        tokenizers,
        encoders,
        layout=layout,
        max_length=text_max_length,
        size_conditioning=bool(getattr(network, "use_additional_conditions", False)),
        # SDXL pipelines use zero embeddings for an empty negative prompt.
        zero_unconditional=not negative_caption and bool(index.get("force_zeros_for_empty_prompt", layout == "sdxl")),
        negative_caption=negative_caption,
        batch_size=text_batch_size,
    )
    denoiser = DiffusersDenoiser.from_scheduler(network, scheduler, timestep_mapping=timestep_mapping)
    codec = LatentCodec(vae, batch_size=vae_batch_size)
    return LatentComponents(denoiser, codec, caption_encoder, source=str(root.resolve()))
