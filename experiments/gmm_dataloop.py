"""Ground truth for the dataloop: an 8-D Gaussian mixture, 3% clean, the rest noisy at 0.4.

With the data distribution known, every model and every restored dataset is scored against
the truth instead of a feature-space proxy:

- **sliced W2** between samples and fresh true samples (512 random directions; the floor is
  the same distance between two true sample sets of that size);
- **weight error**: L1 distance between the true mixture weights and the share of samples
  whose most likely true component is k;
- **NLL**: mean ``-log p_true(x)`` of the samples. The truth's own samples give the
  entropy; a *lower* NLL than that means the samples are more concentrated than the truth
  (they sit too close to the component means).

Runs (the package's own ``train`` and ``run_dataloop``, ``mlp-small``, the same budget per
training): clean only (the 3%), ambient (= loop 1), the same-compute control (fine-tune on
the original data), and the dataloop (fine-tune on the original data restored by the
previous model, sigma_min / 8) with Heun and with stochastic (reverse-SDE) restoration.

Investigation of the over-concentration (``--investigate``):

1. *Which noise band*: the model's denoiser error against the exact mixture denoiser per
   sigma band, and sampling with the exact denoiser swapped in on one band at a time.
2. *The fine-tune's EMA*: the control fine-tuned with a near-zero EMA half-life.
3. *The clean points below sigma_min*: ambient and its control trained with no clean point.
4. *The restoration sampler*: the restored data's NLL with the learned vs the exact
   denoiser, Heun vs stochastic.

Run: ``python experiments/gmm_dataloop.py --out /tmp/gmm`` (a few CPU minutes on 2 cores;
``--quick`` for a smoke run). Writes ``results.json`` and ``results.md`` into ``--out``.
Recorded results: ``experiments/results/gmm_dataloop.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ambient_fast.core.schedules import karras_sigmas
from ambient_fast.data import Sample, corrupt_dataset, load_dataset_tensors, write_dataset
from ambient_fast.loops import run_dataloop, train
from ambient_fast.restoration import load_denoiser, restore_dataset
from ambient_fast.samplers import sample

DIM = 8
SIGMA_MIN = 0.4
CUTOFF = SIGMA_MIN * math.sqrt(4 / 3)  # training eligibility of corrupt samples (s_max 4): 0.462
BANDS = ((0.0, 0.2), (0.2, CUTOFF), (CUTOFF, 2.0), (2.0, 100.0))


@dataclass(frozen=True)
class Mixture:
    """Isotropic Gaussian mixture: ``sum_k w_k N(mu_k, s_k^2 I)`` in ``DIM`` dimensions."""

    weights: torch.Tensor  # (K,) float64
    means: torch.Tensor  # (K, D) float64
    stds: torch.Tensor  # (K,) float64

    @staticmethod
    def make(seed: int = 0) -> Mixture:
        rng = np.random.default_rng(seed)
        weights = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)
        means = torch.from_numpy(rng.uniform(-0.6, 0.6, (5, DIM)))
        stds = torch.tensor([0.12, 0.15, 0.18, 0.2, 0.25], dtype=torch.float64)
        return Mixture(weights, means, stds)

    def draw(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.weights, n, replacement=True, generator=g)
        return self.means[k] + self.stds[k, None] * torch.randn(n, DIM, generator=g, dtype=torch.float64)

    def log_resp(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p_sigma(x) (B,), log responsibilities (B, K))`` of x_sigma = x0 + sigma n."""
        x = x.reshape(len(x), DIM).double()
        var = self.stds.square() + torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).square()  # (B|1, K)
        d2 = (x[:, None, :] - self.means[None]).square().sum(-1)  # (B, K)
        logp = self.weights.log() - 0.5 * DIM * torch.log(2 * math.pi * var) - d2 / (2 * var)
        total = torch.logsumexp(logp, dim=1)
        return total, logp - total[:, None]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The exact ``E[x0 | x_sigma = x]`` (B, D) for per-sample ``sigma`` (B,) (SPEC 7)."""
        shape = x.shape
        xf = x.reshape(len(x), DIM).double()
        sigma = sigma.double().reshape(-1, 1)
        _, log_r = self.log_resp(xf, sigma)
        shrink = self.stds.square() / (self.stds.square() + sigma.square())  # (B, K)
        per_k = self.means[None] + shrink[..., None] * (xf[:, None, :] - self.means[None])
        return (log_r.exp()[..., None] * per_k).sum(1).reshape(shape).to(x.dtype)


class BandSwap(torch.nn.Module):
    """The model's denoiser, with the exact mixture denoiser on ``lo <= sigma < hi``."""

    def __init__(self, model: torch.nn.Module | None, truth: Mixture, lo: float, hi: float):
        super().__init__()
        self.model, self.truth, self.lo, self.hi = model, truth, lo, hi

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        sigma = sigma.reshape(-1).expand(len(x)) if sigma.numel() == 1 else sigma.reshape(-1)
        exact = self.truth.denoise(x, sigma)
        if self.model is None:
            return exact
        inside = ((sigma >= self.lo) & (sigma < self.hi)).reshape(-1, *([1] * (x.dim() - 1)))
        return torch.where(inside, exact, self.model(x, sigma).to(x.dtype))


def sliced_w2(a: torch.Tensor, b: torch.Tensor, projections: int = 512, seed: int = 0) -> float:
    """sqrt(mean over random unit directions of W2^2 of the 1-D projections); equal sizes."""
    n = min(len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(DIM, projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa = (a[:n].reshape(n, DIM).double() @ dirs).sort(0).values
    pb = (b[:n].reshape(n, DIM).double() @ dirs).sort(0).values
    return float((pa - pb).square().mean().sqrt())


def scores(x: torch.Tensor, truth: Mixture, reference: torch.Tensor) -> dict[str, float]:
    logp, log_r = truth.log_resp(x)
    counts = torch.bincount(log_r.argmax(1), minlength=len(truth.weights)).double()
    return {
        "sw2": sliced_w2(x, reference),
        "weight_error": float((counts / counts.sum() - truth.weights).abs().sum()),
        "nll": float(-logp.mean()),
    }


def generate(denoiser, n: int, seed: int, steps: int = 18) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return sample(denoiser, noise, karras_sigmas(steps, 0.002, 80.0), method="heun").float()


def denoiser_error(model, truth: Mixture, seed: int = 0, n: int = 4000) -> dict[str, float]:
    """Mean squared error per element of the model's denoiser against the exact one, per band
    (sigma log-uniform inside each band, x0 from the truth)."""
    out = {}
    g = torch.Generator().manual_seed(seed)
    for lo, hi in BANDS:
        x0 = truth.draw(n, seed + 1)
        sigma = torch.exp(
            torch.empty(n, dtype=torch.float64).uniform_(math.log(max(lo, 0.002)), math.log(hi), generator=g)
        )
        x = x0 + sigma[:, None] * torch.randn(n, DIM, generator=g, dtype=torch.float64)
        with torch.no_grad():
            err = (model(x.float(), sigma.float()).double() - truth.denoise(x, sigma)).square().mean()
        out[f"{lo:g}-{hi:g}"] = float(err)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--loops", type=int, default=3, help="loop 1 = the ambient model")
    parser.add_argument("--total-images", type=int, default=256_000, help="per training run")
    parser.add_argument("--samples", type=int, default=4000, help="generated samples per evaluation")
    parser.add_argument("--investigate", action="store_true", help="also run the over-concentration study")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budget, 1 seed, 2 loops")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.loops, args.total_images, args.samples = [0], 2, 4096, 500
    torch.set_num_threads(1)
    t0, cpu0 = time.perf_counter(), time.process_time()
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    truth = Mixture.make(0)
    n = 2000
    clean_rows = truth.draw(n, seed=1).float()
    clean_path = write_dataset(
        out / "data/clean",
        "tensors",
        [Sample(index=i, key=f"{i:05d}", array=clean_rows[i].numpy()) for i in range(n)],
    )
    data = {
        f: corrupt_dataset(
            clean_path, out / f"data/noisy-clean{f:g}", "noise", fraction=1 - f, std=SIGMA_MIN, selection="exact"
        )  # fmt: skip
        for f in ((0.03, 0.0) if args.investigate else (0.03,))
    }
    reference = truth.draw(args.samples, seed=2)
    floor = scores(truth.draw(args.samples, seed=3), truth, reference)
    train_kwargs = dict(network="mlp-small", total_images=args.total_images, batch_size=256,
                        checkpoint_images=args.total_images, log_every=100)  # fmt: skip
    rows: dict[str, list[dict]] = {}
    data_rows: dict[str, list[dict]] = {}
    error_rows: dict[str, list[dict]] = {}
    corrupt = load_dataset_tensors(data[0.03]).sigma_min > 0
    clean_versions = clean_rows[corrupt]
    truth_clean_nll = float(-truth.log_resp(clean_versions)[0].mean())

    def record(name: str, seed: int, loop: int, denoiser_path: str | Path) -> None:
        model = load_denoiser(denoiser_path)
        rows.setdefault(name, []).append(
            {"seed": seed, "loop": loop, **scores(generate(model, args.samples, 100 + seed), truth, reference)}
        )
        error_rows.setdefault(name, []).append({"seed": seed, "loop": loop, **denoiser_error(model, truth, seed)})

    def record_data(name: str, seed: int, loop: int, path: str | Path) -> None:
        restored = load_dataset_tensors(path).images[corrupt].reshape(-1, DIM)
        s = scores(restored, truth, clean_versions)
        s["mse"] = float((restored - clean_versions).square().mean())
        data_rows.setdefault(name, []).append({"seed": seed, "loop": loop, **s})

    for seed in args.seeds:
        run = out / f"seed{seed}"
        clean = train(data[0.03], run / "clean", mode="clean", seed=1000 * seed, progress=False, **train_kwargs)
        record("clean only (3%)", seed, 1, clean.denoiser_path)
        ambient = train(data[0.03], run / "ambient", mode="ambient", seed=1000 * seed, progress=False, **train_kwargs)
        record("ambient (= loop 1)", seed, 1, ambient.denoiser_path)
        chains = [  # (folder, row name, run_dataloop options)
            ("control", "control (fine-tune on the original data)", dict(train_on="original")),
            ("loop-heun", "dataloop, Heun restoration", dict(restore_kwargs={"rho_ambient": 8.0, "method": "heun"})),
            ("loop-stochastic", "dataloop, stochastic restoration",
             dict(restore_kwargs={"rho_ambient": 8.0, "method": "sde", "num_steps": 64})),
        ]  # fmt: skip
        if args.investigate:
            ema = {**train_kwargs, "ema_halflife_images": 1000}
            chains.append(
                ("control-ema1k", "control, EMA half-life 1k images", dict(train_on="original", train_kwargs=ema))
            )
        for folder, name, options in chains:
            options = {"train_kwargs": train_kwargs, **options}
            result = run_dataloop(
                data[0.03], run / folder, loops=args.loops, init="previous", start_model=ambient.denoiser_path,
                patience=None, seed=1000 * seed, device="cpu", report=False, progress=False, **options,
            )  # fmt: skip
            for r in result.loops:
                if r["loop"] > 1:
                    record(name, seed, r["loop"], r["denoiser"])
                if "data" in r:
                    record_data(name, seed, r["loop"], r["data"])
        if args.investigate:
            none = train(data[0.0], run / "ambient-noclean", mode="ambient", seed=1000 * seed, progress=False,
                         **train_kwargs)  # fmt: skip
            record("ambient, no clean point", seed, 1, none.denoiser_path)
            result = run_dataloop(
                data[0.0], run / "control-noclean", loops=2, init="previous", start_model=none.denoiser_path,
                train_on="original", train_kwargs=train_kwargs, patience=None, seed=1000 * seed, device="cpu",
                report=False, progress=False,
            )  # fmt: skip
            record("control, no clean point", seed, 2, result.loops[-1]["denoiser"])
            # Band swaps on the control's last model: which band's error concentrates the samples?
            control = load_denoiser(run / "control" / f"loop-{args.loops}/train/denoiser.safetensors")
            for lo, hi in ((0.0, 0.0), *BANDS, (0.0, 100.0)):
                label = (
                    "model only" if hi == 0 else ("exact everywhere" if hi - lo == 100 else f"exact on {lo:g}-{hi:g}")
                )
                s = scores(generate(BandSwap(control, truth, lo, hi), args.samples, 100 + seed), truth, reference)
                rows.setdefault(f"swap: {label}", []).append({"seed": seed, "loop": args.loops, **s})
            # The restoration sampler with the exact denoiser (what the sampler alone does).
            for method, steps in (("heun", 18), ("sde", 64)):
                dst = run / f"exact-restore-{method}"
                restore_dataset(BandSwap(None, truth, 0, 100).eval(), data[0.03], dst, method=method, num_steps=steps,
                                start_noise="none", rho_ambient=8.0, seed=1000 * seed, progress=False,
                                model_fingerprint=f"exact-gmm-{method}")  # fmt: skip
                record_data(f"exact denoiser, {method} restoration", seed, 1, dst)
    results = {
        "floor (true samples)": floor,
        "truth NLL of the clean versions of the corrupted points": truth_clean_nll,
        "models": rows,
        "restored data": data_rows,
        "denoiser error per sigma band": error_rows,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu_seconds": time.process_time() - cpu0,
        "wall_seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))


def _mean_std(values: list[float]) -> str:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{m:.4f} +- {s:.4f}"


def markdown(results: dict) -> str:
    floor = results["floor (true samples)"]
    lines = [
        "| model | loop | sliced W2 | weight error | NLL |",
        "|---|---|---|---|---|",
        f"| floor: true samples | - | {floor['sw2']:.4f} | {floor['weight_error']:.4f} | {floor['nll']:.4f} |",
    ]
    for name, runs in results["models"].items():
        for loop in sorted({r["loop"] for r in runs}):
            rs = [r for r in runs if r["loop"] == loop]
            lines.append(
                f"| {name} | {loop} | "
                + " | ".join(_mean_std([r[k] for r in rs]) for k in ("sw2", "weight_error", "nll"))
                + " |"
            )
    lines += [
        "",
        f"Restored data vs the clean versions (truth NLL of those: "
        f"{results['truth NLL of the clean versions of the corrupted points']:.4f}):",
        "",
        "| restoration | by model of loop | sliced W2 | weight error | NLL | MSE |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results["restored data"].items():
        for loop in sorted({r["loop"] for r in runs}):
            rs = [r for r in runs if r["loop"] == loop]
            lines.append(
                f"| {name} | {loop} | "
                + " | ".join(_mean_std([r[k] for r in rs]) for k in ("sw2", "weight_error", "nll", "mse"))
                + " |"
            )
    bands = [f"{lo:g}-{hi:g}" for lo, hi in BANDS]
    lines += ["", "Denoiser MSE per element against the exact mixture denoiser, per sigma band:", ""]
    lines += ["| model | loop | " + " | ".join(f"sigma {b}" for b in bands) + " |", "|---|---|" + "---|" * len(bands)]
    for name, runs in results["denoiser error per sigma band"].items():
        for loop in sorted({r["loop"] for r in runs}):
            rs = [r for r in runs if r["loop"] == loop]
            lines.append(f"| {name} | {loop} | " + " | ".join(_mean_std([r[b] for r in rs]) for b in bands) + " |")
    lines += [
        "",
        f"{results['cpu_seconds']:.0f} CPU-s, {results['wall_seconds']:.0f} s wall; config {results['config']}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
