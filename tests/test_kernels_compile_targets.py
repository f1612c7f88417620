"""Every Triton kernel specialisation the public API launches compiles for sm_90 and sm_80.

No GPU is needed. Two phases:

1. **Record** (in the test process, kernels in Triton's interpreter): every kernel launch is
   intercepted at ``run`` of Triton's kernel classes (``InterpretedFunction`` under
   ``TRITON_INTERPRET=1``, ``JITFunction`` on a GPU) while a dtype x schedule x target x
   split x layout matrix, plus the benchmark sizes, runs through the public entry points
   (``ambient_fast.ambient_loss`` forward and backward, ``ambient_fast.sample``,
   ``ambient_fast.restore``). Each launch is reduced to what Triton specialises a kernel on:
   pointer dtypes and 16-byte alignment, integer arguments' class (== 1, divisible by 16,
   32/64-bit), constexprs and launch options; duplicates are dropped. Launches are recorded
   only, not executed (the specialisation does not depend on the data, and the exactness
   tests in ``test_kernels_triton.py`` run the kernels).
2. **Compile** (a subprocess without the interpreter: this file run as a script): each
   distinct specialisation is compiled through the kernel's own ``warmup`` (the code path of a
   real launch up to, not including, the launch) against a stand-in driver that reports a
   ``cuda`` target of capability 90 (H100/H200) or 80 (A100). This runs Triton's real
   compiler, LLVM and ``ptxas``, none of which the interpreter exercises.

Checked: every specialisation compiles for both targets; no approximate division
(``div.full``; the kernels follow the reference's IEEE rounding); 16-byte vector loads where
every pointer and row stride is 16-byte aligned. Register use, stack and spills of the large
tiles (4096 elements per program) are printed from ``ptxas -v`` (``pytest -s`` shows them).

The launch interception uses Triton's kernel objects only, so it does not depend on how the
package wraps its kernels into custom ops.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # about a minute on 2 idle cores: ~200 specialisations x 2 targets

TARGETS = (90, 80)  # compute capabilities: H100/H200, A100
LARGE_TILE = 4096  # elements per program at which register use is reported
ALIGN = 16  # bytes: Triton specialises pointers and integers on divisibility by 16
INT32 = (-(2**31), 2**31 - 1)


# ----------------------------------------------------------------------------------------------
# Phase 1: record the launches of the public API
# ----------------------------------------------------------------------------------------------


def describe(value) -> list:
    """What Triton specialises a kernel argument on, as JSON (see :func:`representative`)."""
    import torch

    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype).removeprefix("torch."), value.data_ptr() % ALIGN == 0]
    if isinstance(value, bool) or value is None or isinstance(value, float | str):
        return ["value", value]
    if isinstance(value, int):
        kind = "one" if value == 1 else ("div16" if value % ALIGN == 0 else "int")
        return ["int", kind, INT32[0] <= value <= INT32[1]]
    if isinstance(value, torch.dtype):
        return ["value", str(value)]
    raise TypeError(f"kernel argument of unexpected type {type(value).__name__}: {value!r}")


class LaunchRecorder:
    """Collects the distinct specialisations of intercepted kernel launches."""

    def __init__(self) -> None:
        self.launches: dict[str, dict] = {}
        self.count = 0

    def record(self, kernel, args: tuple, kwargs: dict) -> None:
        fn = kernel.fn
        params = list(inspect.signature(fn).parameters.values())
        # Runtime arguments by what Triton specialises on; constexprs and launch options exactly.
        described = [
            ["value", a] if "constexpr" in str(p.annotation) else describe(a)
            for p, a in zip(params, args, strict=False)
        ]
        launch = {
            "module": fn.__module__,
            "name": fn.__name__,
            "args": described,
            "kwargs": {k: ["value", v] for k, v in sorted(kwargs.items())},
        }
        self.launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        self.count += 1


@contextmanager
def recording_launches() -> Iterator[LaunchRecorder]:
    """Intercept every Triton kernel launch (recorded, not executed) inside the block."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    recorder = LaunchRecorder()
    originals = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}

    def run(self, *args, grid, warmup, **kwargs):
        recorder.record(self, args, kwargs)

    for cls in originals:
        cls.run = run
    try:
        yield recorder
    finally:
        for cls, original in originals.items():
            cls.run = original


# Row lengths: 192 (several rows packed per program), 4096 (one full tile per row), 12288
# (three tiles per row: the split forward and its reduction); plus the benchmark sizes
# (benchmarks/bench_kernels.py), whose batch sizes and row lengths specialise on their own.
PACKED, FULL, SPLIT = (5, 3, 8, 8), (3, 4, 32, 32), (2, 3, 64, 64)
BENCH_SIZES = ((512, 3, 32, 32), (64, 4, 64, 64), (8, 3, 512, 512))


def loss_calls(device: str) -> Iterator[tuple[dict, bool]]:
    """``(ambient_loss kwargs, backward)``: the exactness tests' matrix and the benchmark sizes."""
    import torch

    def inputs(shape, dtype, schedule="ve", layout="contiguous"):
        rows = shape[0]
        tensors = [torch.randn(shape, device=device).to(dtype) for _ in range(3)]
        if layout == "channels_last":
            tensors = [t.to(memory_format=torch.channels_last) for t in tensors]
        elif layout == "batch_slice":  # row stride 2N, rows contiguous
            tensors = [torch.randn(rows * 2, *shape[1:], device=device).to(dtype)[::2] for _ in range(3)]
        level_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        hi = 0.9 if schedule == "vp" else 5.0
        sigma = torch.linspace(0.1, hi, rows, device=device, dtype=level_dtype)
        sigma_min = torch.where(torch.arange(rows, device=device) % 2 == 0, 0.0, 0.5 * sigma)
        if layout == "strided_levels":  # columns of a (B, 3) table: stride 3, unaligned
            table = torch.stack([sigma, sigma_min, sigma_min], dim=1)
            sigma, sigma_min = table[:, 1], table[:, 2]
        return dict(pred=tensors[0], y_t=tensors[1], y_tmin=tensors[2], sigma=sigma, sigma_min=sigma_min)

    # dtype x schedule x target x split, forward only and forward + backward.
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for schedule in ("ve", "vp"):
            for target in ("x0", "eps"):
                for shape in (PACKED, SPLIT):
                    for backward in (False, True):
                        yield dict(**inputs(shape, dtype, schedule), schedule=schedule, target=target), backward
    # Options: weight mode x contraction x eligibility rule (split rows: all three kernels).
    for weight in ("edm", None, "tensor"):
        for mode in ("ambient", "contraction"):
            for rule in ({}, {"buffer": 0.05}):
                args = inputs(SPLIT, torch.float32)
                w = torch.rand(SPLIT[0], device=device) + 0.5 if weight == "tensor" else weight
                yield dict(**args, weight=w, mode=mode, **rule), True
    # Layouts (what a network, a batch slice or a level table hands the loss).
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("contiguous", "channels_last", "batch_slice", "strided_levels"):
            for shape in (PACKED, FULL, SPLIT):
                yield dict(**inputs(shape, dtype, layout=layout)), True
    for dtype in (torch.float32, torch.bfloat16):
        for shape in BENCH_SIZES:
            for backward in (False, True):
                yield dict(**inputs(shape, dtype)), backward


def run_loss_matrix(device: str) -> None:
    import torch

    import ambient_fast

    def scale_rows_on_cuda(grad_unit: torch.Tensor) -> None:
        # A backward with a per-sample upstream gradient (e.g. ``reduction="none"`` then a
        # weighted sum) launches the scale kernel on CUDA only (CPU tensors use torch.mul), so
        # the launch a CUDA backward makes is reproduced here with the public launcher.
        from ambient_fast.kernels._layout import empty_rows_like
        from ambient_fast.kernels.ambient_loss import ambient_loss_bwd

        upstream = torch.linspace(0.5, 1.5, grad_unit.shape[0], device=grad_unit.device)
        ambient_loss_bwd(empty_rows_like(grad_unit), grad_unit, upstream)

    for kwargs, backward in loss_calls(device):
        pred = kwargs.pop("pred")
        if backward:
            # A mean's backward returns the gradient written by the forward (no launch); a
            # per-sample upstream gradient scales it with the backward kernel.
            pred = pred.detach().requires_grad_(True)
            ambient_fast.ambient_loss(pred, backend="triton", validate=False, **kwargs).backward()
            scale_rows_on_cuda(pred.grad)
        else:
            with torch.no_grad():
                ambient_fast.ambient_loss(pred, backend="triton", validate=False, **kwargs)


def run_sampler_matrix(device: str) -> None:
    """``sample`` and ``restore`` on per-sample grids (columns of a float64 level table).

    ``stochastic`` launches the churn, Euler and Heun steps, ``sde`` the ancestral step.
    """
    import torch

    import ambient_fast

    def denoiser(x, sigma):
        return x * (0.25 / (0.25 + sigma.to(x.dtype) ** 2)).view(-1, *([1] * (x.dim() - 1)))

    def run(shape, dtype, layout):
        batch = shape[0]
        lo = torch.linspace(0.002, 0.2, batch, dtype=torch.float64)
        sigmas = ambient_fast.karras_sigmas(2, lo, torch.full((batch,), 10.0, dtype=torch.float64))
        noise = torch.randn(shape, device=device).to(dtype)
        if layout == "channels_last":
            noise = noise.to(memory_format=torch.channels_last)
        for method in ("churn", "sde"):
            ambient_fast.sample(denoiser, noise, sigmas, method=method, S_churn=10.0, backend="triton")

    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for shape in (PACKED, FULL, SPLIT):
            run(shape, dtype, "contiguous")
    for dtype in (torch.float32, torch.bfloat16):
        for shape in (PACKED, SPLIT):
            run(shape, dtype, "channels_last")
        for shape in BENCH_SIZES:
            run(shape, dtype, "contiguous")
    for state_dtype in (torch.float32, torch.float64):
        for method in ("heun", "euler", "sde"):
            y0 = torch.randn(4, 3, 16, 16, device=device)
            sigma_min = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64, device=device)
            seeds = torch.arange(4, device=device)
            ambient_fast.restore(
                denoiser,
                y0,
                sigma_min,
                num_steps=3,
                method=method,
                seeds=seeds,
                state_dtype=state_dtype,
                backend="triton",
            )


# ----------------------------------------------------------------------------------------------
# Phase 2: compile each specialisation (this file run as a script, without the interpreter)
# ----------------------------------------------------------------------------------------------


def representative(desc: list):
    """An argument that Triton specialises exactly as the recorded one."""
    import torch

    kind = desc[0]
    if kind == "value":
        value = desc[1]
        if isinstance(value, str) and value.startswith("torch."):
            return getattr(torch, value.removeprefix("torch."))
        return value
    if kind == "int":
        value = {"one": 1, "div16": 16, "int": 3}[desc[1]]
        return value if desc[2] else value + 2**40
    dtype = getattr(torch, desc[1])
    base = torch.empty(64, dtype=dtype)  # CPU allocations are 64-byte aligned
    return base if desc[2] else base[1:]


class TargetDriver:
    """Stands in for the CUDA driver: reports one target, never launches (compile-only warm-ups)."""

    def __init__(self, capability: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch  # one binder cache per target

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def find_kernel(module: str, name: str):
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(module)
    kernel = getattr(mod, name, None)
    if not isinstance(kernel, JITFunction):
        raise LookupError(f"{module}.{name} is not a module-level @triton.jit kernel")
    return kernel


def triton_dir() -> str:
    spec = importlib.util.find_spec("triton")
    return str(Path(spec.origin).parent) if spec and spec.origin else ""


def ptxas_report(ptx: str) -> dict:
    """Registers, stack frame and spill bytes from ``ptxas -v`` (Triton's bundled ptxas)."""
    ptxas = Path(triton_dir()) / "backends" / "nvidia" / "bin" / "ptxas"
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE)  # sm_90a for capability 90
    if not ptxas.exists() or target is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        result = subprocess.run(
            [str(ptxas), "-v", f"--gpu-name={target.group(1)}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
        )
    log = result.stderr + result.stdout
    numbers = {
        "registers": r"Used (\d+) registers",
        "stack_bytes": r"(\d+) bytes stack frame",
        "spill_store_bytes": r"(\d+) bytes spill stores",
        "spill_load_bytes": r"(\d+) bytes spill loads",
    }
    report = {}
    for key, pattern in numbers.items():
        match = re.search(pattern, log)
        if match:
            report[key] = int(match.group(1))
    return report


def tile_elements(kwargs: dict) -> int:
    blocks = [v[1] for k, v in kwargs.items() if k.startswith("BLOCK_") and v[0] == "value"]
    return math.prod(blocks) if blocks else 0


def compile_launch(launch: dict, capability: int) -> dict:
    """Compile one recorded launch for ``capability``; facts about its PTX and registers."""
    import triton

    kernel = find_kernel(launch["module"], launch["name"])
    args = [representative(d) for d in launch["args"]]
    kwargs = {k: representative(d) for k, d in launch["kwargs"].items()}
    # This process only compiles: the stand-in stays active (there is no driver to go back to).
    triton.runtime.driver.set_active(TargetDriver(capability))
    compiled = kernel.warmup(*args, grid=(1,), **kwargs)
    ptx = compiled.asm["ptx"]
    # 16-byte vectors: fp32 v4.b32 (or .f32), bf16/fp16 v4.b32 (8 halves), fp64 v2.b64 (or .f64).
    result = {
        "vector_loads": bool(re.search(r"ld\.global(\.[a-z0-9:]+)*\.v(4\.[bf]32|2\.[bf]64)", ptx)),
        "approx_division": "div.full" in ptx or "div.approx" in ptx,
        "tile_elements": tile_elements(launch["kwargs"]),
    }
    if result["tile_elements"] >= LARGE_TILE:
        result.update(ptxas_report(ptx))
    return result


def compile_all(launches: list[dict]) -> list[dict]:
    results = []
    for launch in launches:
        for capability in TARGETS:
            row = {"launch": launch, "capability": capability}
            try:
                row.update(compile_launch(launch, capability))
            except Exception as err:  # noqa: BLE001 - every failure is reported by the test
                row["error"] = f"{type(err).__name__}: {err}"[-3000:]
            results.append(row)
    return results


def main(argv: list[str]) -> int:
    """``python tests/test_kernels_compile_targets.py LAUNCHES.json RESULTS.json [WORKER N]``."""
    launches = json.loads(Path(argv[0]).read_text())
    if len(argv) > 2:
        worker, workers = int(argv[2]), int(argv[3])
        launches = launches[worker::workers]
    Path(argv[1]).write_text(json.dumps(compile_all(launches)))
    return 0


# ----------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------


def aligned(launch: dict) -> bool:
    """Every pointer 16-byte aligned and every row stride / length a multiple of 16 elements."""
    args = launch["args"]
    return all(d[2] for d in args if d[0] == "tensor") and all(d[1] != "int" for d in args if d[0] == "int")


def label(launch: dict) -> str:
    dtypes = sorted({d[1] for d in launch["args"] if d[0] == "tensor"})
    consts = ", ".join(f"{k}={v[1]}" for k, v in launch["kwargs"].items() if v[0] == "value")
    return f"{launch['name']}({'/'.join(dtypes)}; {consts})"


def test_kernels_compile_for_sm90_and_sm80(tmp_path):
    import torch

    pytest.importorskip("triton.backends.nvidia")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with recording_launches() as recorder:
        run_loss_matrix(device)
        run_sampler_matrix(device)
    launches = list(recorder.launches.values())
    names = {launch["name"] for launch in launches}
    print(f"\n{recorder.count} launches, {len(launches)} distinct specialisations of {len(names)} kernels")
    assert len(names) >= 7, f"expected the loss (fwd, reduce, bwd) and four step kernels, got {sorted(names)}"

    spec_file = tmp_path / "launches.json"
    spec_file.write_text(json.dumps(launches))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    workers = max(1, min(2, os.cpu_count() or 1))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(spec_file), str(tmp_path / f"out{i}.json"), str(i), str(workers)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
    ]
    for proc in procs:
        _, stderr = proc.communicate()
        assert proc.returncode == 0, stderr[-4000:]
    results = [row for i in range(workers) for row in json.loads((tmp_path / f"out{i}.json").read_text())]
    assert len(results) == len(launches) * len(TARGETS)

    failures = [f"sm_{r['capability']} {label(r['launch'])}: {r['error']}" for r in results if "error" in r]
    assert not failures, f"{len(failures)} of {len(results)} compilations failed:\n" + "\n".join(failures[:10])
    approx = [label(r["launch"]) for r in results if r["approx_division"]]
    assert not approx, f"approximate division in {approx[:5]}"
    unvectorised = [
        f"sm_{r['capability']} {label(r['launch'])}"
        for r in results
        if aligned(r["launch"]) and r["tile_elements"] >= 256 and not r["vector_loads"]
    ]
    assert not unvectorised, "aligned tiles without 16-byte loads:\n" + "\n".join(unvectorised[:10])

    large = [r for r in results if "registers" in r]
    assert large or not (Path(triton_dir()) / "backends" / "nvidia" / "bin" / "ptxas").exists()
    print(f"ptxas -v of the {len(large)} large-tile compilations ({LARGE_TILE} elements per program), per kernel:")
    groups: dict[tuple, list[dict]] = {}
    for r in large:
        dtypes = "/".join(sorted({d[1] for d in r["launch"]["args"] if d[0] == "tensor"}))
        groups.setdefault((r["launch"]["name"], dtypes, r["capability"]), []).append(r)
    for (name, dtypes, capability), rows in sorted(groups.items()):
        print(
            f"  sm_{capability} {name:32s} {dtypes:18s} {len(rows):3d} variants: registers "
            f"{min(r['registers'] for r in rows)}-{max(r['registers'] for r in rows)}, stack "
            f"{max(r['stack_bytes'] for r in rows)} B, spills {max(r['spill_store_bytes'] for r in rows)} B"
        )
    spilling = [label(r["launch"]) for r in large if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spilling, f"large tiles spill registers: {spilling[:5]}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
