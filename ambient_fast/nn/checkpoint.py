"""Checkpoints as safetensors files: denoisers, and whole training states.

Denoiser format (``format_version`` 1):

- tensors: the ``state_dict`` of the raw network ``F`` (what ``EDMPrecond`` wraps; SPEC 1);
- metadata key ``"ambient_fast"``: JSON
  ``{"format_version": 1, "network": NAME, "network_kwargs": {...}, "precond": "edm",
  "sigma_data": 0.5, "extra": {...}}``. ``NAME`` and ``network_kwargs`` are what
  :func:`ambient_fast.nn.build_network` takes; ``extra`` is free-form (training step, EMA
  length, ...), stored and returned but never interpreted.

Loading never unpickles anything and never imports a module named by the file: the only
code that runs is ``build_network`` with the stored name, which looks it up in the
package's own registry. Writes are atomic (temporary file + rename), mode 0644 under umask 022.

Training state (``training-state.safetensors``, :func:`save_training_state`): a nested dict
(model, EMA, optimiser, step, RNG and sampler states, config) whose tensors and arrays are
stored by name and whose skeleton is JSON in the metadata key ``"ambient_fast.training_state"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.precond import EDMPrecond
from ..core.schedules import SIGMA_DATA
from ..runtime import atomic_write

__all__ = [
    "DenoiserConfig",
    "save_denoiser",
    "load_denoiser",
    "read_denoiser_config",
    "file_sha256",
    "module_fingerprint",
    "save_training_state",
    "load_training_state",
]

METADATA_KEY = "ambient_fast"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class DenoiserConfig:
    """What a checkpoint says about its network (everything but the weights)."""

    network: str  # name for ambient_fast.nn.build_network
    network_kwargs: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable kwargs
    sigma_data: float = SIGMA_DATA  # EDMPrecond sigma_data (0.5 for images in [-1, 1])
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, not interpreted

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "network": self.network,
                "network_kwargs": self.network_kwargs,
                "precond": "edm",
                "sigma_data": self.sigma_data,
                "extra": self.extra,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "checkpoint") -> DenoiserConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: metadata '{METADATA_KEY}' is not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: metadata '{METADATA_KEY}' must be a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: unsupported checkpoint format_version {version!r} (expected {FORMAT_VERSION})")
        if raw.get("precond", "edm") != "edm":
            raise ValueError(f"{source}: unsupported precond {raw.get('precond')!r} (only 'edm')")
        network, kwargs, extra = raw.get("network"), raw.get("network_kwargs", {}), raw.get("extra", {})
        sigma_data = raw.get("sigma_data", SIGMA_DATA)
        if not isinstance(network, str) or not network:
            raise ValueError(f"{source}: 'network' must be a non-empty string, got {network!r}")
        if not isinstance(kwargs, dict) or not isinstance(extra, dict):
            raise ValueError(f"{source}: 'network_kwargs' and 'extra' must be JSON objects")
        if not isinstance(sigma_data, (int, float)) or not math.isfinite(sigma_data) or sigma_data <= 0:
            raise ValueError(f"{source}: 'sigma_data' must be a finite number > 0, got {sigma_data!r}")
        return cls(network, kwargs, float(sigma_data), extra)


def _build_network(config: DenoiserConfig) -> nn.Module:
    from . import build_network

    return build_network(config.network, **config.network_kwargs)


def save_denoiser(
    path: str | os.PathLike[str],
    network: nn.Module,
    *,
    name: str,
    network_kwargs: dict[str, Any] | None = None,
    sigma_data: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``network``'s weights and config to ``path`` (safetensors), atomically.

    Args:
        path: destination file (conventionally ``*.safetensors``).
        network: the raw network ``F``, or an :class:`EDMPrecond` wrapping it (then its
            ``net`` is saved and its ``sigma_data`` is the default).
        name, network_kwargs: how :func:`ambient_fast.nn.build_network` rebuilds it.
        sigma_data: EDM ``sigma_data`` (default: the wrapper's, else 0.5).
        extra: free-form JSON-serialisable metadata (training step, EMA, ...).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    if isinstance(network, EDMPrecond):
        sigma_data = network.sigma_data if sigma_data is None else sigma_data
        network = network.net
    config = DenoiserConfig(name, dict(network_kwargs or {}), float(sigma_data or SIGMA_DATA), dict(extra or {}))
    DenoiserConfig.from_json(config.to_json(), "save_denoiser")  # same checks as on load
    state = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={METADATA_KEY: config.to_json()}))
    return path


def read_denoiser_config(path: str | os.PathLike[str]) -> DenoiserConfig:
    """The config stored in a checkpoint, without reading the weights."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        hint = f"; it holds {path / 'denoiser.safetensors'}" if (path / "denoiser.safetensors").is_file() else ""
        raise FileNotFoundError(f"{path} is a folder, not a denoiser checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path}: no '{METADATA_KEY}' metadata; write checkpoints with save_denoiser()")
    return DenoiserConfig.from_json(metadata[METADATA_KEY], str(path))


def load_denoiser(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> EDMPrecond:
    """Rebuild the EDM denoiser ``D(x, sigma)`` stored at ``path`` (SPEC 1).

    Args:
        path: a file written by :func:`save_denoiser`.
        device: where to put the weights.
        dtype: cast the network's floating weights to this dtype (default: as stored).

    Returns:
        ``EDMPrecond(net, sigma_data)`` in eval mode with gradients off. The state dict must
        match the rebuilt network exactly (missing or unexpected keys are an error).
    """
    from safetensors.torch import load_file

    config = read_denoiser_config(path)
    net = _build_network(config)
    state = load_file(str(path), device="cpu")
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not match network {config.network!r}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    denoiser = EDMPrecond(net, config.sigma_data).to(device)
    if dtype is not None:
        denoiser.net.to(dtype)
    return denoiser.eval().requires_grad_(False)


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """Hex SHA-256 over a module's class name and its state dict (names, dtypes, shapes, bytes).

    Two modules with the same fingerprint compute the same function (for the same code);
    the resume check uses it to refuse continuing a run with different weights.
    """
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for key, value in sorted(module.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Whole training states: tensors by name, everything else as JSON metadata.

TRAINING_STATE_KEY = "ambient_fast.training_state"


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors and arrays of a nested state into ``tensors``; return the JSON skeleton."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": prefix}
    if isinstance(obj, dict):
        pairs = [
            [_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
            for i, (k, v) in enumerate(obj.items())
        ]
        return {"__dict__": pairs}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_training_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a nested training state (dicts, lists, tuples, tensors, numpy arrays, JSON
    scalars) as one safetensors file, atomically (tuples come back as tuples)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_flatten(state, "s", tensors))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={TRAINING_STATE_KEY: skeleton}))


def load_training_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a file of :func:`save_training_state` back into its nested dict (CPU tensors).

    Training runs (``ambient_fast.loops.train``) store ``step``, ``images``, ``config``,
    ``model``, ``ema``, ``optimizer``, ``scaler``, ``sampler``, ``rng``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    if meta is None or TRAINING_STATE_KEY not in meta:
        raise ValueError(f"{path} is not an ambient_fast training state")
    return _unflatten(json.loads(meta[TRAINING_STATE_KEY]), load_file(str(path)))
