"""Run folders, JSON records and rank-aware printing shared by training, annotation and loops.

A run lives in an auto-numbered folder ``<root>/00003-<desc>/`` (EDM's convention): the
number is one more than the largest already in ``root``. Every record is written atomically
(temporary file + ``os.replace``) so a killed process never leaves half a JSON behind, which
is what makes ``--resume`` safe.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DistInfo",
    "append_jsonl",
    "dist_info",
    "init_distributed",
    "next_run_dir",
    "print0",
    "read_json",
    "read_jsonl",
    "resolve_device",
    "shared_run_dir",
    "write_json",
]

_RUN_ID = re.compile(r"^(\d{5})-")


def next_run_dir(root: str | Path, desc: str, *, create: bool = True) -> Path:
    """``root/NNNNN-desc`` with ``NNNNN`` one more than the largest existing run id in ``root``."""
    root = Path(root)
    ids = [int(m.group(1)) for p in root.iterdir() if (m := _RUN_ID.match(p.name))] if root.is_dir() else []
    path = root / f"{max(ids, default=-1) + 1:05d}-{desc}"
    if create:
        path.mkdir(parents=True, exist_ok=False)
    return path


def shared_run_dir(root: str | Path, desc: str) -> Path:
    """:func:`next_run_dir` created by rank 0 and broadcast to every rank (torchrun-safe)."""
    info = dist_info()
    path = next_run_dir(root, desc) if info.is_main else None
    if info.world_size > 1:
        box = [str(path) if path is not None else None]
        torch.distributed.broadcast_object_list(box, src=0)
        path = Path(box[0])
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """Replace NaN/inf floats by None so the file stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=2)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    """Load a JSON file."""
    return json.loads(Path(path).read_text())


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (used for training logs; a torn last line is skipped on read)."""
    with open(path, "a") as f:
        f.write(json.dumps(_finite(record), default=_json_default) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete JSON lines of ``path`` ([] if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: this rank's CUDA device when CUDA is available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def init_distributed(device: str | torch.device = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun, else a 1-process run.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; uses NCCL on CUDA and gloo on CPU.
    Calling it again in an initialised process returns the same description.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def dist_info() -> DistInfo:
    """Rank and world size of the current process group (1 process when none)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(rank, world, local_rank, resolve_device("auto", local_rank))


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if dist_info().is_main:
        print(*args, **kwargs, flush=True)
