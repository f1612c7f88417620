"""Rank-agnostic control plane: the same code runs as 1 process or N under ``torchrun``.

Only small control messages cross ranks (a barrier, rank 0's verdict on the staging
folder, per-rank counters); the data never does. With an NCCL default group the control
messages go over a separate gloo group so they never touch the GPU streams.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["RankContext", "init_from_env"]

T = TypeVar("T")


@dataclass
class RankContext:
    """This process's place in the job (``world_size == 1`` without torch.distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None  # process group for control messages (None: the default group)

    @classmethod
    def current(cls) -> RankContext:
        """From an initialised default process group, else a single-process context."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(1, torch.cuda.device_count() or 1)))
        return cls(dist.get_rank(), dist.get_world_size(), local, group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and return its result on every rank; its exception is
        raised on every rank (so no rank waits forever for a rank that failed)."""
        result: T | None = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
                error = err
        if self.world_size > 1:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0, group=self.group)
            result, error = box[0]
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (a small picklable object), on every rank."""
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        return out


def init_from_env() -> RankContext:
    """Initialise torch.distributed when launched by ``torchrun`` (``WORLD_SIZE > 1``).

    Backend: NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``), else gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return RankContext.current()
