"""The runtime every command shares: ranks and collectives, run folders, JSON records, the
one "refuse to resume when an argument changed" guard, and shutdown.

Ranks. The same code runs as 1 process or N under ``torchrun``: :func:`init_runtime` joins
the process group that torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; NCCL on
CUDA, gloo on CPU) and returns a :class:`RankContext`. Only small control messages cross
ranks through it (a barrier, rank 0's verdict, per-rank counters, a mean loss); with an NCCL
default group they go over a separate gloo group so they never touch the GPU streams.
:func:`shutdown` meets every rank at a barrier (success path) and destroys the group, so no
rank closes its sockets while a peer is still between its last collective and teardown (a
gloo abort seen in CI).

Run folders are auto-numbered ``<root>/00003-<desc>/`` (EDM's convention). Every JSON record
is written atomically (temporary file + ``os.replace``) with the usual file mode (0644 under
the default umask), so a killed process never leaves half a file behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "ArgumentsChanged",
    "RankContext",
    "append_jsonl",
    "atomic_write",
    "check_unchanged",
    "describe_changes",
    "init_runtime",
    "next_run_dir",
    "print0",
    "read_json",
    "read_jsonl",
    "resolve_device",
    "shared_run_dir",
    "shutdown",
    "write_json",
    "write_jsonl",
]

T = TypeVar("T")
_RUN_ID = re.compile(r"^(\d{5})-")


# ---------------------------------------------------------------------------------------
# Ranks and collectives.


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: this rank's CUDA device when CUDA is available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


@dataclass
class RankContext:
    """This process's place in the job (``world_size == 1`` without torch.distributed).

    ``device`` is the device this rank computes on; ``group`` the process group for control
    messages (None: the default group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: Any = None

    @classmethod
    def current(cls, device: str | torch.device = "auto") -> RankContext:
        """From the initialised default process group, else a single-process context."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(device=resolve_device(device, 0))
        global _CONTROL_GROUP
        if _CONTROL_GROUP is None:  # created once: new_group is itself a collective
            _CONTROL_GROUP = (None,) if dist.get_backend() == "gloo" else (dist.new_group(backend="gloo"),)
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(1, torch.cuda.device_count() or 1)))
        return cls(dist.get_rank(), dist.get_world_size(), local, resolve_device(device, local), _CONTROL_GROUP[0])

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` (a small picklable object) on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

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
        result, error = self.broadcast((result, error))
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

    def all_reduce_mean(self, value: torch.Tensor) -> float:
        """Mean of a scalar tensor over the ranks (on the default group: the tensor's device)."""
        if self.world_size > 1:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.world_size
        return float(value)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs, flush=True)


_CONTROL_GROUP: tuple[Any] | None = None


def init_runtime(device: str | torch.device = "auto") -> RankContext:
    """Join the torchrun process group when launched by torchrun, else a 1-process run.

    Backend: NCCL when this rank's device is CUDA (each rank on ``cuda:LOCAL_RANK``), else
    gloo. Calling it again in an initialised process returns the same description.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return RankContext.current(dev)


def shutdown(ctx: RankContext | None = None, *, ok: bool = True) -> None:
    """End the job's distributed part: meet at a barrier (when ``ok``: after a rank-local
    error a barrier could wait on a peer blocked in another collective), then destroy the
    process group. A no-op in a single process."""
    global _CONTROL_GROUP
    if not (dist.is_available() and dist.is_initialized()):
        return
    if ok:
        (ctx or RankContext.current()).barrier()
    dist.destroy_process_group()
    _CONTROL_GROUP = None


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    RankContext.current().print(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# Run folders.


def next_run_dir(root: str | Path, desc: str, *, create: bool = True) -> Path:
    """``root/NNNNN-desc`` with ``NNNNN`` one more than the largest existing run id in ``root``."""
    root = Path(root)
    ids = [int(m.group(1)) for p in root.iterdir() if (m := _RUN_ID.match(p.name))] if root.is_dir() else []
    path = root / f"{max(ids, default=-1) + 1:05d}-{desc}"
    if create:
        path.mkdir(parents=True, exist_ok=False)
    return path


def shared_run_dir(root: str | Path, desc: str, *, create: bool = True) -> Path:
    """:func:`next_run_dir` chosen (and created, if ``create``) by rank 0, the same on every rank."""
    ctx = RankContext.current()
    return Path(ctx.on_main(lambda: str(next_run_dir(root, desc, create=create))))


# ---------------------------------------------------------------------------------------
# Files and JSON.


def _file_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open(path, "w")`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(tmp_path)`` into a temporary file beside it, give it
    the usual file mode (0644 under umask 022; ``mkstemp`` makes 0600), then rename it over
    ``path``: readers see the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def to_json_value(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples -> lists, paths -> str, NaN -> None)."""
    return _finite(json.loads(json.dumps(obj, default=_json_default)))


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_json_value(obj), indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | Path) -> Any:
    """Load a JSON file."""
    return json.loads(Path(path).read_text())


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (training logs; a torn last line is skipped on read)."""
    with open(path, "a") as f:
        f.write(json.dumps(_finite(record), default=_json_default) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` by these JSON lines, atomically."""
    text = "".join(json.dumps(_finite(r), default=_json_default) + "\n" for r in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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


# ---------------------------------------------------------------------------------------
# The resume guard.


class ArgumentsChanged(ValueError):
    """A resumed run was given arguments that differ from the ones it was started with."""


def describe_changes(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    may_change: Iterable[str] = (),
    label: Callable[[str], str] = str,
) -> list[str]:
    """One ``"<label(name)>: was A, now B"`` line per argument that differs, sorted by name.

    Both mappings are compared as they read back from JSON (tuples and lists alike); keys in
    ``may_change`` (training length, progress, device, ...) are not compared.
    """
    skip = set(may_change)
    old, new = to_json_value(dict(saved)), to_json_value(dict(current))
    return [
        f"{label(k)}: was {old.get(k, '<unset>')!r}, now {new.get(k, '<unset>')!r}"
        for k in sorted(set(old) | set(new))
        if k not in skip and old.get(k) != new.get(k)
    ]


def check_unchanged(
    saved: Mapping[str, Any], current: Mapping[str, Any], *, may_change: Iterable[str] = (), where: str
) -> None:
    """Refuse to continue ``where`` when an argument differs from the saved run's
    (compared as :func:`describe_changes` does).

    Raises:
        ArgumentsChanged: naming every differing argument, ``name: was A, now B``.
    """
    changes = describe_changes(saved, current, may_change=may_change)
    if changes:
        raise ArgumentsChanged(
            f"cannot resume {where}: options differ from the saved run ({'; '.join(changes)}); use a new run folder"
        )
