"""Anchor-style EDM / Ambient code vs ``ambient_fast.compat``: one training step, one sampling batch.

CIFAR-10 geometry (3x32x32). Both sides run the same network and the same math:

- training step (ANCHORS 1.1/1.2): the Dataloops loop body + ``AmbientEDMLoss`` written
  eagerly as the anchors do (``x_tn_hat``, ``w_amb``, ``lambda_EDM``; ``loss.sum()`` and
  backward; Adam step), vs :class:`~ambient_fast.compat.EDMAmbientLoss` per element (eager),
  per sample through the fused op (eager), and per element under ``torch.compile``;
- sampling (ANCHORS 3.1): EDM's 18-step Heun ``edm_sampler`` (NFE 35, float64 state) written
  eagerly, vs :func:`~ambient_fast.compat.edm_sampler` eager, eager without EDM's unused
  per-step noise draws, with a compiled network, with float32 state (not EDM's numbers), and
  on GPU with CUDA graphs (``torch.compile(mode="reduce-overhead")``).

Each variant's output is checked against the anchor-style result before it is timed.
Reported: median wall time over ``--repeats`` runs after warm-up, images/s, and network
evaluations/s for the sampler.

Usage::

    python benchmarks/bench_compat.py                      # CPU, small batches
    python benchmarks/bench_compat.py --gpu                # CUDA, CIFAR-10 DDPM++ net, batch 512 / 256
    python benchmarks/bench_compat.py --write benchmarks/results/compat.md
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch._inductor.config

from ambient_fast import EDMPrecond
from ambient_fast.compat import EDMAmbientLoss, edm_sampler
from ambient_fast.nn import build_network, count_parameters

SIGMA_DATA = 0.5
SIGMA_MIN_CORRUPT = 1.2  # CIFAR-10 blur 0.6 annotation (ANCHORS 2)
BUFFER = math.sqrt(4.0 / 3.0)  # s_max = 4
CORRUPT_FRACTION = 0.9


# ----------------------------------------------------------------------------------------
# Anchor-style code (eager, as in the public training loop / generate.py; ANCHORS 1, 3.1).


def anchor_training_loss(net, images, noise, sigma_t, sigma_min, sigma_max):
    """Dataloops loop body + AmbientEDMLoss: per-element (B, C, H, W)."""
    sigma_tn = torch.where(sigma_t < sigma_max, torch.zeros_like(sigma_min), sigma_min)
    x_tn = images + noise * sigma_tn[:, None, None, None]
    sigma_tn = sigma_tn[:, None, None, None]
    sigma_t = sigma_t[:, None, None, None]
    x_t = x_tn + torch.randn_like(x_tn) * torch.sqrt(sigma_t**2 - sigma_tn**2)
    x0_pred = net(x_t, sigma_t, None)
    r2 = (sigma_tn / sigma_t) ** 2
    x_tn_pred = (1 - r2) * x0_pred + r2 * x_t
    edm_weight = (SIGMA_DATA**2 + sigma_t**2) / (sigma_t**2 * SIGMA_DATA**2)
    ambient_factor = sigma_t**4 / ((sigma_t**2 - sigma_tn**2) ** 2)
    return edm_weight * ambient_factor * ((x_tn_pred - x_tn) ** 2)


@torch.no_grad()
def anchor_edm_sampler(net, latents, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM generate.py::edm_sampler, deterministic (S_churn = 0), float64 state."""
    idx = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (
        sigma_max ** (1 / rho) + idx / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        x_cur = x_next
        t_hat = t_cur
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * torch.randn_like(x_cur)
        denoised = net(x_hat, t_hat, None).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next, None).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# ----------------------------------------------------------------------------------------
# Harness.


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(
    variants: list[tuple[str, Callable[[], object]]], device: torch.device, warmup: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, process CPU seconds) per variant.

    Runs are interleaved (every variant once per round, ``repeats`` rounds after ``warmup``
    rounds), so a change in the machine's load hits all variants alike. Process CPU time
    (all threads) is the work done; on a shared machine it is steadier than wall time.
    """
    for _ in range(warmup):
        for _, fn in variants:
            fn()
    sync(device)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    for _ in range(repeats):
        for name, fn in variants:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
        for name, runs in samples.items()
    }


def training_batch(batch: int, device: torch.device, seed: int = 0):
    """Images, frozen noise and annotations as the noise-first sampler would pair them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    images = (torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1).to(device)
    noise = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(batch, generator=g))
    corrupt = (sigma > BUFFER * SIGMA_MIN_CORRUPT) & (torch.rand(batch, generator=g) < CORRUPT_FRACTION)
    sigma_min = torch.where(corrupt, SIGMA_MIN_CORRUPT, 0.0)
    return images, noise, sigma.to(device), sigma_min.to(device), torch.zeros_like(sigma_min).to(device)


def make_net(preset: str, device: torch.device, seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    return EDMPrecond(build_network(preset, channels=3, dropout=0.0)).to(device)


def bench_training(args, device: torch.device) -> list[tuple[str, float, float]]:
    net = make_net(args.net, device)
    images, noise, sigma, sigma_min, sigma_max = training_batch(args.train_batch, device)
    batch = images.shape[0]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

    def run_step(loss_of: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_of().sum().mul(1.0 / batch).backward()
            optimizer.step()

        return step

    per_element = EDMAmbientLoss(reduction="none", backend=args.backend, validate=False)
    per_sample = EDMAmbientLoss(reduction="per_sample", backend=args.backend, validate=False)
    kwargs = dict(images=images, sigma=sigma, sigma_min=sigma_min, sigma_max=sigma_max, noise=noise)

    def compat_element():
        return per_element(net=net, **kwargs)

    def compat_sample():
        return per_sample(net=net, **kwargs)

    variants: list[tuple[str, Callable[[], torch.Tensor]]] = [
        (
            "anchor-style eager (per element)",
            lambda: anchor_training_loss(net, images, noise, sigma, sigma_min, sigma_max),
        ),
        ("ambient_fast eager, per element", compat_element),
        ("ambient_fast eager, per sample (fused op)", compat_sample),
    ]
    if not args.skip_compile:
        variants.append(("ambient_fast torch.compile, per element", torch.compile(compat_element, fullgraph=True)))
    # Same numbers first (same seed -> same fresh noise), on a copy of the weights.
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(1)
    reference = variants[0][1]().sum().item()
    for name, fn in variants[1:]:
        torch.manual_seed(1)
        value = fn().sum().item()
        print(
            f"  check {name}: loss sum {value:.6g} vs anchor {reference:.6g} "
            f"(rel {abs(value - reference) / abs(reference):.1e})"
        )
    net.load_state_dict(state)
    timed = time_variants([(name, run_step(fn)) for name, fn in variants], device, args.warmup, args.repeats)
    rows = []
    for name, (seconds, cpu) in timed.items():
        rows.append((name, seconds, cpu))
        print(f"  train  {name:<48s} {seconds * 1e3:9.1f} ms  {batch / seconds:9.1f} img/s  cpu {cpu * 1e3:9.1f} ms")
    return rows


def bench_sampling(args, device: torch.device) -> list[tuple[str, float, float]]:
    net = make_net(args.net, device).eval().requires_grad_(False)
    latents = torch.randn(args.sample_batch, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(device)
    batch, nfe = latents.shape[0], 2 * args.steps - 1
    variants: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("anchor-style eager (EDM edm_sampler)", lambda: anchor_edm_sampler(net, latents, args.steps)),
        ("ambient_fast eager", lambda: edm_sampler(net, latents, num_steps=args.steps, backend=args.backend)),
        (
            "ambient_fast eager, exact_rng=False",
            lambda: edm_sampler(net, latents, num_steps=args.steps, exact_rng=False, backend=args.backend),
        ),
    ]
    if not args.skip_compile:
        compiled = torch.compile(net, fullgraph=True, dynamic=False)
        variants.append(
            (
                "ambient_fast, compiled net",
                lambda: edm_sampler(compiled, latents, num_steps=args.steps, exact_rng=False, backend=args.backend),
            )
        )
        variants.append(
            (
                "ambient_fast, compiled net, fp32 state*",
                lambda: edm_sampler(
                    compiled,
                    latents,
                    num_steps=args.steps,
                    exact_rng=False,
                    state_dtype=torch.float32,
                    backend=args.backend,
                ),
            )
        )
        if device.type == "cuda":
            graphed = torch.compile(net, mode="reduce-overhead", fullgraph=True, dynamic=False)
            variants.append(
                (
                    "ambient_fast, CUDA graphs",
                    lambda: edm_sampler(graphed, latents, num_steps=args.steps, exact_rng=False, backend=args.backend),
                )
            )
    torch.manual_seed(3)
    reference = variants[0][1]()
    for name, fn in variants[1:]:
        torch.manual_seed(3)
        diff = (fn().double() - reference).abs().max().item()
        print(f"  check {name}: max |x - anchor| = {diff:.1e}")
    timed = time_variants(variants, device, args.warmup, args.repeats)
    rows = []
    for name, (seconds, cpu) in timed.items():
        rows.append((name, seconds, cpu))
        print(
            f"  sample {name:<48s} {seconds * 1e3:9.1f} ms  {batch / seconds:9.1f} img/s  "
            f"{batch * nfe / seconds:9.1f} NFE-img/s  cpu {cpu * 1e3:9.1f} ms"
        )
    return rows


def resolved_backend(name: str, device: torch.device) -> str:
    from ambient_fast.kernels.dispatch import get_backend

    return get_backend(name, device).name


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
        f"(2 cores shared with 5 other engineers' jobs: timings are noisy, compare ratios), torch {torch.__version__}"
    )


def write_results(path: str, args, device, train_rows, sample_rows, params: int) -> None:
    nfe = 2 * args.steps - 1

    def table(rows, batch: int, extra_nfe: bool) -> list[str]:
        base_wall, base_cpu = rows[0][1], rows[0][2]
        head = "| variant | wall ms | img/s | speed-up (wall) | CPU ms | speed-up (CPU) |" + (
            " NFE-img/s |" if extra_nfe else ""
        )
        sep = "|---|---:|---:|---:|---:|---:|" + ("---:|" if extra_nfe else "")
        lines = [head, sep]
        for name, seconds, cpu in rows:
            line = (
                f"| {name} | {seconds * 1e3:.1f} | {batch / seconds:.1f} | {base_wall / seconds:.2f}x "
                f"| {cpu * 1e3:.1f} | {base_cpu / cpu:.2f}x |"
            )
            if extra_nfe:
                line += f" {batch * nfe / seconds:.0f} |"
            lines.append(line)
        return lines

    out = [
        f"## {'GPU' if device.type == 'cuda' else 'CPU'} — {args.net} ({params:,} parameters), 3x32x32",
        "",
        "- date: 2026-11-22",
        f"- machine: {machine_line(device)}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- median of {args.repeats} interleaved rounds after {args.warmup} warm-up rounds; fused-op backend "
        f"`{args.backend}` (resolved: `{resolved_backend(args.backend, device)}`); "
        "CPU ms = process CPU time, all threads",
        "",
        f"Training step (loss + backward + Adam), batch {args.train_batch}:",
        "",
        *table(train_rows, args.train_batch, False),
        "",
        f"Sampling, {args.steps}-step Heun (NFE {nfe}), batch {args.sample_batch}:",
        "",
        *table(sample_rows, args.sample_batch, True),
        "",
        "\\* float32 sampler state: faster, but not EDM's float64 numbers.",
        "",
    ]
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run on CUDA (CIFAR-10 DDPM++ network, large batches)")
    parser.add_argument("--net", default=None, help="ambient_fast.nn preset (CPU: unet-tiny, GPU: unet-cifar10)")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (CPU 16, GPU 512)")
    parser.add_argument("--sample-batch", type=int, default=None, help="sampling batch (CPU 16, GPU 256)")
    parser.add_argument("--steps", type=int, default=18, help="sampler steps (EDM CIFAR-10: 18)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per variant (compiles)")
    parser.add_argument(
        "--backend", default="auto", choices=["auto", "torch", "triton", "cpp"], help="fused-op backend"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-compile", action="store_true", help="skip torch.compile variants")
    parser.add_argument("--write", default=None, help="append a Markdown section to this file")
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    if min(args.repeats, args.steps - 1) < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1, --steps >= 2, --warmup >= 0")
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.net = args.net or ("unet-cifar10" if args.gpu else "unet-tiny")
    args.train_batch = args.train_batch or (512 if args.gpu else 16)
    args.sample_batch = args.sample_batch or (256 if args.gpu else 16)
    if args.gpu:
        torch.backends.cudnn.benchmark = True
    # Compiled graphs draw their noise with torch's generator, as eager does: same seed, same numbers.
    torch._inductor.config.fallback_random = True
    params = count_parameters(build_network(args.net, channels=3))
    print(f"{machine_line(device)}\nnetwork {args.net}: {params:,} parameters")
    train_rows = bench_training(args, device)
    sample_rows = bench_sampling(args, device)
    if args.write:
        write_results(args.write, args, device, train_rows, sample_rows, params)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
