"""The bundled demo: does the ambient loss beat the baselines on the digits, and do loops help?

Data: scikit-learn's 1,797 8x8 digits (bundled, no download), 3% left clean (54 images),
the rest corrupted, as two datasets built by :func:`ambient_fast.data.demo_dataset`:

- **blur**: Gaussian blur 0.6 px, annotated ``sigma_min = 1.0``;
- **noise**: additive Gaussian noise at a known std, annotated ``sigma_min = std`` and stored
  noisy (the corrupt samples *are* noisy at sigma_min, so the ambient loss is exact there).

Runs, all with the same training budget (network, images, batch) and several seeds:

1. ``clean``: only the 54 clean images (shared by both corruptions: same clean subset);
2. ``plain``: every image as if clean;
3. ``contraction``: corrupt images only above their buffered sigma_min, plain loss;
4. ``ambient``: the ambient loss;
5. ``loop``: a dataloop started from (4): restore the original data with model (4),
   annotate ``sigma_min / rho``, train again (fine-tune from (4), or from scratch).

Metric: Frechet distance in the digits feature space (``ambient_fast.eval.fd_digits``) to
the *clean versions of the corrupted images*, which no model saw; memorisation: the share of
samples within ``DIGITS_COPY_THRESHOLD`` (RMS) of one of the 54 clean training images.

Independent runs execute in ``jobs`` worker processes (one thread each by default): tiny
networks scale better across processes than across threads, and a busy machine does not
stall them.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEMO_PRESETS", "LoopVariant", "DemoResult", "run_demo", "format_table"]

MODES = ("clean", "plain", "contraction", "ambient")
MODE_LABELS = {
    "clean": "clean only (54 images)",
    "plain": "all data, plain loss",
    "contraction": "contraction only",
    "ambient": "ambient loss",
}


@dataclass(frozen=True)
class LoopVariant:
    """One dataloop setting for run (5): ``init`` of the loop-2 model and restoration ``rho``."""

    init: str = "previous"  # "previous" (fine-tune model 4) or "scratch"
    rho: float = 8.0  # restored samples are annotated sigma_min / rho

    @property
    def name(self) -> str:
        return f"loop ({'fine-tune' if self.init == 'previous' else 'scratch'}, sigma_min/{self.rho:g})"

    @property
    def key(self) -> str:
        return f"loop-{self.init}-rho{self.rho:g}"


# Settings; "default" is what `ambient-fast demo` runs (< 10 minutes on 2 idle cores).
DEMO_PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        seeds=(0, 1),  # training seeds (the datasets are fixed)
        network="mlp-base",  # 426k-parameter residual MLP
        total_images=384_000,  # per run: 1500 steps at batch 256
        eval_samples=2000,  # generated samples per evaluation
        loop_variants=(LoopVariant("previous", 8.0),),
    ),
    "quick": dict(
        seeds=(0,),
        network="mlp-small",
        total_images=256 * 12,
        eval_samples=256,
        loop_variants=(LoopVariant("previous", 8.0),),
    ),
    "study": dict(  # the loop variants behind docs/demo_results.md (about 4x the default)
        seeds=(0, 1, 2),
        network="mlp-base",
        total_images=384_000,
        eval_samples=2000,
        loop_variants=(
            LoopVariant("previous", 8.0),
            LoopVariant("previous", 2.0),
            LoopVariant("scratch", 8.0),
            LoopVariant("scratch", 2.0),
        ),
    ),
}


@dataclass
class DemoResult:
    """Numbers of one demo run (also in ``demo.json``)."""

    run_dir: Path
    table: dict[str, dict[str, dict[str, Any]]]  # corruption -> row name -> {mean, std, values, memorisation}
    seconds: float  # wall time of the whole demo
    runs: list[dict[str, Any]] = field(default_factory=list)  # every individual run


def run_demo(
    run_dir: str | Path,
    *,
    preset: str = "default",  # "default", "quick" or "study"
    seeds: tuple[int, ...] | None = None,  # override the preset's seeds
    corruptions: tuple[str, ...] = ("blur", "noise"),  # which datasets
    clean_fraction: float = 0.03,  # share of clean images (0.03 = 54)
    sigma_blur: float = 0.6,  # blur std in pixels
    blur_sigma_min: float = 1.0,  # annotation of blurred images
    noise_std: float = 0.4,  # additive noise std in [-1, 1] units (= its sigma_min; 0.2 is invisible to FD_digits)
    network: str | None = None,  # override the preset's network
    total_images: int | None = None,  # override the preset's training length
    batch_size: int = 256,  # training batch
    eval_samples: int | None = None,  # override the preset's sample count
    loop_variants: tuple[LoopVariant, ...] | None = None,  # override the preset's loop settings
    jobs: int = 2,  # worker processes
    data_root: str | Path | None = None,  # where the demo datasets live (default: run_dir/data)
    progress: bool = True,  # print one line per finished run
) -> DemoResult:
    """Run the demo into ``run_dir``; writes ``metrics.json`` (the table), ``demo.json`` (also
    every run), ``table.md`` and ``report.png`` beside the runs' folders."""
    from ..data import demo_dataset, open_dataset
    from ..runtime import write_json

    if preset not in DEMO_PRESETS:
        raise ValueError(f"preset must be one of {sorted(DEMO_PRESETS)}, got {preset!r}")
    settings = dict(DEMO_PRESETS[preset])
    for name, value in (
        ("seeds", seeds),
        ("network", network),
        ("total_images", total_images),
        ("eval_samples", eval_samples),
        ("loop_variants", loop_variants),
    ):
        if value is not None:
            settings[name] = value
    if not corruptions or set(corruptions) - {"blur", "noise"}:
        raise ValueError(f"corruptions must be a non-empty subset of ('blur', 'noise'), got {corruptions}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data_root = Path(data_root) if data_root is not None else run_dir / "data"
    datasets = {
        c: str(
            demo_dataset(
                data_root,
                c,
                clean_fraction,
                0,
                sigma_blur=sigma_blur,
                noise_std=noise_std,
                sigma_min=blur_sigma_min if c == "blur" else None,
            )
        )
        for c in corruptions
    }
    clean_data = str(demo_dataset(data_root, None))
    clean_sets = {c: open_dataset(path).sigma_min == 0 for c, path in datasets.items()}
    if any((mask != clean_sets[corruptions[0]]).any() for mask in clean_sets.values()):
        raise RuntimeError("the demo datasets do not share their clean subset; run (1) cannot be shared")
    config = {
        "preset": preset,
        **settings,
        "corruptions": list(corruptions),
        "clean_fraction": clean_fraction,
        "sigma_blur": sigma_blur,
        "blur_sigma_min": blur_sigma_min,
        "noise_std": noise_std,
        "batch_size": batch_size,
        "jobs": jobs,
        "datasets": datasets,
        "clean_data": clean_data,
    }
    config["loop_variants"] = [v.key for v in settings["loop_variants"]]
    write_json(run_dir / "config.json", config)
    common = {
        "network": settings["network"],
        "total_images": settings["total_images"],
        "batch_size": batch_size,
        "eval_samples": settings["eval_samples"],
        "clean_data": clean_data,
    }

    # Phase 1: the four modes (clean-only once: both datasets share the clean subset).
    tasks: list[dict[str, Any]] = []
    for seed in settings["seeds"]:
        tasks.append(
            {
                **common,
                "kind": "train",
                "corruption": "shared",
                "mode": "clean",
                "seed": seed,
                "data": datasets[corruptions[0]],
                "out": str(run_dir / f"clean-seed{seed}"),
            }
        )
        for c in corruptions:
            for mode in MODES[1:]:
                tasks.append(
                    {
                        **common,
                        "kind": "train",
                        "corruption": c,
                        "mode": mode,
                        "seed": seed,
                        "data": datasets[c],
                        "out": str(run_dir / f"{c}-{mode}-seed{seed}"),
                    }
                )
    results: list[dict[str, Any]] = []
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=_spawn(), initializer=_init_worker, initargs=(threads,)) as pool:
        pending: dict[Future, dict[str, Any]] = {pool.submit(_run_task, t): t for t in tasks}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                result = future.result()
                results.append(result)
                if progress:
                    print(
                        f"[demo {time.perf_counter() - t0:6.0f}s] {result['corruption']:>6s} {result['row']:<34s} "
                        f"seed {result['seed']}: "
                        f"FD {result['fd']:8.2f}, copies {100 * result['memorisation']:5.1f}%",
                        flush=True,
                    )
                # Phase 2: dataloops start from the ambient model as soon as it exists.
                if task["kind"] == "train" and task["mode"] == "ambient":
                    for variant in settings["loop_variants"]:
                        loop_task = {
                            **task,
                            "kind": "loop",
                            "init": variant.init,
                            "rho": variant.rho,
                            "row": variant.name,
                            "start_model": result["denoiser"],
                            "out": f"{task['out']}-{variant.key}",
                        }
                        pending[pool.submit(_run_task, loop_task)] = loop_task
    seconds = time.perf_counter() - t0
    table = _table(results, corruptions, settings["loop_variants"])
    result = DemoResult(run_dir, table, seconds, sorted(results, key=lambda r: (r["corruption"], r["row"], r["seed"])))
    summary = {"config": config, "seconds": seconds, "cpu_minutes": _cpu_minutes(result), "table": table}
    write_json(run_dir / "metrics.json", summary)
    write_json(run_dir / "demo.json", {**summary, "runs": result.runs})
    text = format_table(result, config)
    (run_dir / "table.md").write_text(text + "\n")
    _report(run_dir / "report.png", result, datasets, clean_data)
    return result


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_task(task: dict[str, Any]) -> dict[str, Any]:
    """One run in a worker: train (or a 2-loop dataloop from the ambient model), evaluate."""
    import torch

    from ..data import load_dataset_tensors
    from .evaluate import evaluate_denoiser

    data = load_dataset_tensors(task["data"])
    clean = load_dataset_tensors(task["clean_data"])
    corrupt = data.sigma_min > 0
    reference = clean.images[data.ids[corrupt]]  # clean versions of the corrupted images
    train_clean = data.images[~corrupt]
    t0, cpu0 = time.perf_counter(), time.process_time()
    out = {"corruption": task["corruption"], "seed": task["seed"], "kind": task["kind"]}
    train_kwargs = {
        "network": task["network"],
        "total_images": task["total_images"],
        "batch_size": task["batch_size"],
        "checkpoint_images": task["total_images"],
        "log_every": 50,
    }
    if task["kind"] == "train":
        from .train import train

        result = train(task["data"], task["out"], mode=task["mode"], seed=task["seed"], progress=False, **train_kwargs)
        denoiser = result.denoiser_path
        out.update(row=MODE_LABELS[task["mode"]], mode=task["mode"], denoiser=str(denoiser))
    else:
        from .dataloop import run_dataloop

        loop = run_dataloop(
            task["data"],
            task["out"],
            loops=2,
            init=task["init"],
            start_model=task["start_model"],
            train_kwargs=train_kwargs,
            restore_kwargs={"rho_ambient": task["rho"]},
            reference=None,
            seed=task["seed"],
            device="cpu",
            resume=(Path(task["out"]) / "state.json").exists(),
            restore_last=False,
            report=False,
            progress=False,
        )
        denoiser = Path(loop.loops[-1]["denoiser"])
        out.update(row=task["row"], mode=f"loop-{task['init']}-rho{task['rho']:g}", denoiser=str(denoiser))
    scores = evaluate_denoiser(
        denoiser,
        reference,
        num_samples=task["eval_samples"],
        seed=1000 + task["seed"],
        train_images=train_clean,
        device="cpu",
    )
    out.update(
        fd=scores["value"],
        memorisation=scores["memorisation"],
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - cpu0,
        threads=torch.get_num_threads(),
    )
    return out


def _table(results: list[dict[str, Any]], corruptions: tuple[str, ...], variants: tuple[LoopVariant, ...]) -> dict:
    rows = [MODE_LABELS[m] for m in MODES] + [v.name for v in variants]
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for c in corruptions:
        table[c] = {}
        for row in rows:
            runs = [r for r in results if r["row"] == row and r["corruption"] in (c, "shared")]
            if not runs:
                continue
            fds = [r["fd"] for r in sorted(runs, key=lambda r: r["seed"])]
            mean = sum(fds) / len(fds)
            std = math.sqrt(sum((x - mean) ** 2 for x in fds) / (len(fds) - 1)) if len(fds) > 1 else 0.0
            table[c][row] = {
                "mean": mean,
                "std": std,
                "values": fds,
                "memorisation": sum(r["memorisation"] for r in runs) / len(runs),
            }
    return table


def format_table(result: DemoResult, config: dict[str, Any]) -> str:
    """Markdown table: FD (mean +- std over seeds) and memorisation per corruption and run."""
    corruptions = list(result.table)
    head = (
        "| run | "
        + " | ".join(
            f"{c} (sigma_B {config['sigma_blur']:g}, sigma_min {config['blur_sigma_min']:g})"
            if c == "blur"
            else f"{c} (std {config['noise_std']:g} = sigma_min)"
            for c in corruptions
        )
        + " |"
    )
    lines = [head, "|---|" + "---|" * len(corruptions)]
    rows = list(dict.fromkeys(row for c in corruptions for row in result.table[c]))
    for row in rows:
        cells = []
        for c in corruptions:
            cell = result.table[c].get(row)
            cells.append(
                "-"
                if cell is None
                else f"{cell['mean']:.2f} +- {cell['std']:.2f} ({100 * cell['memorisation']:.0f}% copies)"
            )
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    seeds = len(config["seeds"])
    lines.append("")
    lines.append(
        f"FD_digits to the clean versions of the corrupted images (lower is better), mean +- std over "
        f"{seeds} seed(s); copies: share of samples within RMS {_threshold():g} of a clean training image. "
        f"{config['network']}, {config['total_images']:,} images per run at batch {config['batch_size']}; "
        f"wall time {result.seconds / 60:.1f} min; the runs used {_cpu_minutes(result):.1f} CPU-minutes "
        f"({config['jobs']} worker process(es))."
    )
    return "\n".join(lines)


def _cpu_minutes(result: DemoResult) -> float:
    return sum(r.get("cpu_seconds", 0.0) for r in result.runs) / 60


def _threshold() -> float:
    from ..eval import DIGITS_COPY_THRESHOLD

    return DIGITS_COPY_THRESHOLD


def _report(path: Path, result: DemoResult, datasets: dict[str, str], clean_data: str) -> None:
    """Bars of FD per run and corruption, and a grid of corrupt / clean / generated digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ..data import load_dataset_tensors
    from ..restoration import load_denoiser
    from .evaluate import generate
    from .report import image_grid

    corruptions = list(result.table)
    fig, axes = plt.subplots(2, len(corruptions), figsize=(7 * len(corruptions), 9), squeeze=False)
    for j, c in enumerate(corruptions):
        ax = axes[0, j]
        rows = list(result.table[c])
        means = [result.table[c][r]["mean"] for r in rows]
        stds = [result.table[c][r]["std"] for r in rows]
        ax.barh(range(len(rows)), means, xerr=stds, color=[f"C{i}" for i in range(len(rows))])
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("FD_digits to clean versions (lower is better)")
        ax.set_title(c)
        for i, r in enumerate(rows):
            ax.text(means[i], i, f" {100 * result.table[c][r]['memorisation']:.0f}% copies", va="center", fontsize=7)
        data = load_dataset_tensors(datasets[c])
        clean = load_dataset_tensors(clean_data)
        corrupt = torch.nonzero(data.sigma_min > 0).flatten()[:10]
        grid_rows = [data.images[corrupt], clean.images[data.ids[corrupt]]]
        labels = ["corrupt", "clean version"]
        for mode in ("plain", "contraction", "ambient"):
            run = next((r for r in result.runs if r["corruption"] == c and r.get("mode") == mode), None)
            if run is not None:
                grid_rows.append(generate(load_denoiser(run["denoiser"]), 10, tuple(data.images.shape[1:]), seed=7))
                labels.append(f"{mode} samples")
        ax = axes[1, j]
        ax.imshow(image_grid(grid_rows).numpy(), interpolation="nearest")
        h = data.images.shape[-2] + 1
        ax.set_yticks([1 + h * i + h / 2 for i in range(len(labels))])
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xticks([])
    fig.suptitle(f"ambient-fast demo ({result.seconds / 60:.1f} min)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
