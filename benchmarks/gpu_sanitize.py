"""One launch of each Triton kernel through the public API, for ``compute-sanitizer --tool memcheck``.

``run_gpu.sh`` runs this under the sanitizer (``--error-exitcode 9``: any out-of-bounds or
misaligned access fails the stage). Launched: the loss forward with rows packed several per
program and with split rows (forward + reduction), its backward, and the Euler, Heun, churn and
ancestral steps (``sample`` with ``stochastic`` and ``sde``), in fp32 and bf16, at sizes whose
last tiles are partial (masks exercised) and with a channels_last state. Each result is
compared with the plain-PyTorch backend, so a silent wrong answer fails too.

    python benchmarks/gpu_sanitize.py OUTDIR [--dry-run]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import Results, stage_args, sync  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__.splitlines()[0], argv)
    import torch

    import ambient_fast

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    results = Results(
        args.outdir,
        "sanitizer",
        "One launch per kernel (compute-sanitizer memcheck)",
        ["call", "dtype", "shape", "max_abs_err", "bound", "ok"],
    )
    torch.manual_seed(0)
    failures = 0

    def compare(call: str, dtype, shape, fast: torch.Tensor, ref: torch.Tensor, ref64: torch.Tensor) -> None:
        """fp32: relative 1e-4; bf16: the tests' three-way rule against the fp64 reference."""
        nonlocal failures
        sync()
        err = (fast.double() - ref64).abs().max().item()
        scale = max(1.0, ref64.abs().max().item())
        if dtype == torch.float32:
            bound = 1e-4 * scale
        else:
            bound = 2 * (ref.double() - ref64).abs().max().item() + torch.finfo(dtype).eps * scale
        ok = bool(err <= bound)
        failures += not ok
        results.add(
            call=call,
            dtype=str(dtype).removeprefix("torch."),
            shape="x".join(map(str, shape)),
            max_abs_err=err,
            bound=bound,
            ok=ok,
        )

    # Partial last tiles: 193 elements per row (packed), 3 x 4096 + 7 (split into 4 chunks).
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((6, 1, 1, 193), (3, 1, 3, 4099)):
            pred, y_t, y_tmin = (torch.randn(shape, device=device).to(dtype) for _ in range(3))
            batch = shape[0]
            sigma = torch.linspace(0.2, 3.0, batch, device=device)
            sigma_min = torch.where(torch.arange(batch, device=device) % 2 == 0, 0.0, 0.4 * sigma)
            per_backend = {}
            for backend, cast in (("triton", dtype), ("torch", dtype), ("torch64", torch.float64)):
                leaf = pred.detach().to(cast).requires_grad_(True)
                rest = [t.to(cast) for t in (y_t, y_tmin)] + [
                    t.to(torch.promote_types(t.dtype, cast)) for t in (sigma, sigma_min)
                ]
                loss = ambient_fast.ambient_loss(leaf, *rest, reduction="none", backend=backend.removesuffix("64"))
                loss.sum().backward()
                per_backend[backend] = (loss.detach(), leaf.grad)
            for i, what in enumerate(("fwd", "bwd")):
                fast, ref, ref64 = (per_backend[b][i] for b in ("triton", "torch", "torch64"))
                compare(f"ambient_loss {what}", dtype, shape, fast, ref, ref64)

    def denoiser(x, sigma):
        return x * (0.25 / (0.25 + sigma.to(x.dtype) ** 2)).view(-1, 1, 1, 1)

    for dtype in (torch.float32, torch.bfloat16):
        shape = (5, 3, 17, 19)
        noise = torch.randn(shape, device=device).to(dtype).to(memory_format=torch.channels_last)
        lo = torch.linspace(0.002, 0.3, shape[0], dtype=torch.float64)
        sigmas = ambient_fast.karras_sigmas(3, lo, torch.full((shape[0],), 20.0, dtype=torch.float64))
        seeds = torch.arange(shape[0], device=device)
        for method in ("stochastic", "sde"):
            out = {
                backend: ambient_fast.sample(
                    denoiser,
                    noise.to(cast),
                    sigmas,
                    method=method,
                    S_churn=10.0,
                    seeds=seeds,
                    backend=backend.removesuffix("64"),
                )
                for backend, cast in (("triton", dtype), ("torch", dtype), ("torch64", torch.float64))
            }
            compare(f"sample {method}", dtype, shape, out["triton"], out["torch"], out["torch64"])
    if device == "cuda":
        torch.cuda.synchronize()
        results.note(
            "every launch synchronised; errors are against backend='torch' in float64 (bf16: the tests' three-way rule)"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
