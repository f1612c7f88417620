"""Shared by the ``benchmarks/gpu_*.py`` stages of ``benchmarks/run_gpu.sh``.

:class:`Results` writes every row to ``NAME.json`` and ``NAME.md`` the moment it is measured
(each file replaced atomically), so a stage killed by its time budget still leaves what it
measured. :func:`stage_args` is the command line every stage shares: an output folder and
``--dry-run`` (CPU, tiny sizes: checks the script's logic, not the device).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

__all__ = ["Results", "machine", "stage_args", "sync"]


def stage_args(description: str, argv: list[str] | None = None, **extra) -> argparse.Namespace:
    """``OUTDIR [--dry-run]`` plus ``extra`` options ``name=(type, default, help)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("outdir", type=Path, help="folder the results are written to (created)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: exercise the script only")
    for name, (kind, default, text) in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=text)
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    return args


def machine() -> dict:
    """Device, versions and date of this measurement."""
    import torch

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    else:
        info["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores), no CUDA"
    return info


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Results:
    """Rows of one stage, rewritten to ``outdir/name.json`` and ``outdir/name.md`` after each add."""

    def __init__(self, outdir: Path, name: str, title: str, columns: list[str]) -> None:
        self.json_path = outdir / f"{name}.json"
        self.md_path = outdir / f"{name}.md"
        self.title, self.columns = title, columns
        self.meta = {"stage": name, **machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self._write()

    def add(self, **row) -> dict:
        """Record one measured row (printed, and both files rewritten)."""
        self.rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        self._write()
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)
        self._write()

    def _write(self) -> None:
        payload = {"meta": self.meta, "rows": self.rows, "notes": self.notes}
        _replace(self.json_path, json.dumps(payload, indent=1, default=str) + "\n")
        lines = [
            f"### {self.title}",
            "",
            f"{self.meta['device']}; torch {self.meta['torch']}, "
            f"triton {self.meta['triton']}; {self.meta['date']}; `{self.meta['command']}`",
            "",
        ]
        lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in self.columns) + " |")
        lines += [""] + [f"- {n}" for n in self.notes]
        _replace(self.md_path, "\n".join(lines) + "\n")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def environment(outdir: Path) -> dict:
    """``outdir/env.json``: versions, device, ``nvidia-smi``, which optional tools and modules exist."""
    import importlib.util
    import shutil
    import subprocess

    info: dict = {"meta": machine(), "tools": {}, "modules": {}}
    for tool in ("nvidia-smi", "compute-sanitizer", "ncu", "nvcc"):
        info["tools"][tool] = shutil.which(tool)
    for module in ("nvidia.dali", "diffusers", "pytorch_fid", "hypothesis", "ambient_fast._C"):
        try:
            info["modules"][module] = importlib.util.find_spec(module) is not None
        except ImportError:
            info["modules"][module] = False
    if info["tools"]["nvidia-smi"]:
        query = "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,power.limit"
        smi = subprocess.run(["nvidia-smi", query, "--format=csv"], capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip()
    _replace(outdir / "env.json", json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1), flush=True)
    return info


if __name__ == "__main__":
    environment(stage_args("Environment of a GPU run (env.json)").outdir)
