"""The bundled demo: the ambient loss, then Ambient Dataloops against a same-compute control.

Data: scikit-learn's 1,797 8x8 digits (bundled, no download), 3% left clean (54 images),
the rest corrupted, built by :func:`ambient_fast.data.demo_dataset`:

- **noise** (the default demo): additive Gaussian noise, std 0.4, annotated
  ``sigma_min = 0.4`` and stored noisy (the corrupt samples *are* noisy at sigma_min);
- **blur** (``--preset study``): Gaussian blur 0.6 px, annotated ``sigma_min = 1.0``.

Runs, every training with the same budget (network, images, batch), for each seed:

- baselines: ``clean`` (only the 54 clean images; shared by the corruptions), and in the
  study ``plain`` (every image as if clean) and ``contraction`` (corrupt images only above
  their buffered sigma_min, plain loss);
- ``ambient``: the ambient loss; it is loop 1 of every chain below;
- chains of loops 2..L from the ambient model, each loop one more training budget
  (:func:`~ambient_fast.loops.dataloop.run_dataloop`):
  the **dataloop** (fine-tune from the previous EMA on the original data restored by the
  previous model, annotated ``sigma_min / rho``) and the **control** (fine-tune on the
  original data, nothing restored: the same compute without the restoration).

Metric: Frechet distance in the digits feature space (``ambient_fast.eval.fd_digits``) to
the *clean versions of the corrupted images*, which no model saw
(:func:`~ambient_fast.loops.evaluate.clean_reference`); the restored data is scored the
same way (FD and MSE to the clean versions); copies: the share of samples within
``DIGITS_COPY_THRESHOLD`` (RMS) of one of the 54 clean training images.

Independent runs execute in ``jobs`` worker processes (one thread each by default): tiny
networks scale better across processes than across threads. A chain's loop k+1 is queued as
soon as its loop k finished; a tqdm bar counts the training runs, with an ETA from the first
finished one.
"""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEMO_MINUTES", "DEMO_PRESETS", "DemoResult", "LoopVariant", "format_table", "run_demo"]

BASELINES = ("clean", "plain", "contraction")
MODE_LABELS = {
    "clean": "clean only (54 images)",
    "plain": "all data, plain loss",
    "contraction": "contraction only",
    "ambient": "ambient loss (= loop 1)",
}


@dataclass(frozen=True)
class LoopVariant:
    """One chain of loops 2..L from the ambient model (SPEC 6)."""

    init: str = "previous"  # "previous" (fine-tune the previous loop's EMA) or "scratch"
    rho: float = 8.0  # restored samples are annotated sigma_min / rho (the trust rate rho_ambient)
    train_on: str = "restored"  # "restored" (the dataloop) or "original" (the same-compute control)

    @property
    def name(self) -> str:
        how = "fine-tune" if self.init == "previous" else "scratch"
        if self.train_on == "original":
            return f"control ({how} on the original data)"
        return f"dataloop ({how}, sigma_min/{self.rho:g})"

    @property
    def key(self) -> str:
        if self.train_on == "original":
            return f"control-{self.init}"
        return f"loop-{self.init}-rho{self.rho:g}"


DATALOOP = LoopVariant("previous", 8.0)
CONTROL = LoopVariant("previous", 8.0, "original")

# "default" is what `ambient-fast demo` runs: DEMO_MINUTES on 2 idle cores (docs/demo_results.md).
DEMO_MINUTES = "about 5 minutes"
DEMO_PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        corruptions=("noise",),
        seeds=(0, 1),  # training seeds (the datasets are fixed)
        network="mlp-base",  # 426k-parameter residual MLP
        total_images=384_000,  # per training run (= per loop): 1500 steps at batch 256
        eval_samples=2000,  # generated samples per evaluation
        loops=5,  # loop 1 is the ambient model
        baselines=("clean",),
        loop_variants=(DATALOOP, CONTROL),
    ),
    "quick": dict(
        corruptions=("noise",),
        seeds=(0,),
        network="mlp-small",
        total_images=256 * 12,
        eval_samples=256,
        loops=2,
        baselines=("clean",),
        loop_variants=(DATALOOP, CONTROL),
    ),
    "study": dict(  # the sweep behind docs/demo_results.md's variants
        corruptions=("noise", "blur"),
        seeds=(0, 1),
        network="mlp-base",
        total_images=384_000,
        eval_samples=2000,
        loops=5,
        baselines=BASELINES,
        loop_variants=(
            DATALOOP,
            LoopVariant("previous", 4.0),
            LoopVariant("previous", 2.0),
            LoopVariant("scratch", 8.0),
            CONTROL,
        ),
    ),
}


@dataclass
class DemoResult:
    """Numbers of one demo run (also in ``demo.json``)."""

    run_dir: Path
    table: dict[str, dict[str, Any]]  # corruption -> {"baselines": {row: stats}, "loops": {variant: [per loop]}}
    seconds: float  # wall time of the whole demo
    runs: list[dict[str, Any]] = field(default_factory=list)  # every individual training run


def run_demo(
    run_dir: str | Path,
    *,
    preset: str = "default",  # "default", "quick" or "study"
    seeds: tuple[int, ...] | None = None,  # override the preset's seeds
    corruptions: tuple[str, ...] | None = None,  # override the preset's datasets ("noise", "blur")
    loops: int | None = None,  # override the preset's loop count (loop 1 = the ambient model)
    clean_fraction: float = 0.03,  # share of clean images (0.03 = 54)
    sigma_blur: float = 0.6,  # blur std in pixels
    blur_sigma_min: float = 1.0,  # annotation of blurred images
    noise_std: float = 0.4,  # additive noise std in [-1, 1] units (= its sigma_min; 0.2 is invisible to FD_digits)
    network: str | None = None,  # override the preset's network
    total_images: int | None = None,  # override the preset's training length (per run, = per loop)
    batch_size: int = 256,  # training batch
    eval_samples: int | None = None,  # override the preset's sample count
    loop_variants: tuple[LoopVariant, ...] | None = None,  # override the preset's chains
    jobs: int = 2,  # worker processes
    data_root: str | Path | None = None,  # where the demo datasets live (default: run_dir/data)
    progress: bool = True,  # tqdm bar over the training runs and one line per finished run
) -> DemoResult:
    """Run the demo into ``run_dir``; writes ``metrics.json`` (the tables), ``demo.json`` (also
    every run), ``table.md`` and ``report.png`` beside the runs' folders."""
    from ..data import demo_dataset, open_dataset
    from ..runtime import write_json

    if preset not in DEMO_PRESETS:
        raise ValueError(f"preset must be one of {sorted(DEMO_PRESETS)}, got {preset!r}")
    settings = dict(DEMO_PRESETS[preset])
    overrides = {
        "seeds": seeds,
        "corruptions": corruptions,
        "loops": loops,
        "network": network,
        "total_images": total_images,
        "eval_samples": eval_samples,
        "loop_variants": loop_variants,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    corruptions = tuple(settings["corruptions"])
    if not corruptions or set(corruptions) - {"blur", "noise"}:
        raise ValueError(f"corruptions must be a non-empty subset of ('blur', 'noise'), got {corruptions}")
    if settings["loops"] < 1:
        raise ValueError(f"loops must be >= 1, got {settings['loops']}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    say = _printer(progress)
    say(f"building the demo datasets in {data_root or run_dir / 'data'} ...")
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
        raise RuntimeError("the demo datasets do not share their clean subset; the clean-only run cannot be shared")
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
        "loop_variants": [v.key for v in settings["loop_variants"]],
    }
    write_json(run_dir / "config.json", config)
    common = {
        "network": settings["network"],
        "total_images": settings["total_images"],
        "batch_size": batch_size,
        "eval_samples": settings["eval_samples"],
        "clean_data": clean_data,
    }

    # Phase 1: the ambient models (loop 1 of every chain) first, then the baselines.
    tasks: list[dict[str, Any]] = []
    for seed in settings["seeds"]:
        for c in corruptions:
            tasks.append(_train_task(common, c, "ambient", seed, datasets[c], run_dir))
    for seed in settings["seeds"]:
        if "clean" in settings["baselines"]:
            tasks.append(_train_task(common, "shared", "clean", seed, datasets[corruptions[0]], run_dir))
        for c in corruptions:
            for mode in settings["baselines"]:
                if mode != "clean":
                    tasks.append(_train_task(common, c, mode, seed, datasets[c], run_dir))
    chain_steps = len(settings["seeds"]) * len(corruptions) * len(settings["loop_variants"]) * (settings["loops"] - 1)
    total_runs = len(tasks) + chain_steps
    say(
        f"{total_runs} training runs of {settings['total_images']:,} images ({settings['network']}) in {jobs} "
        f"worker process(es): {len(tasks)} ambient/baseline runs, then {chain_steps} loop steps"
    )
    results: list[dict[str, Any]] = []
    bar = _bar(total_runs, progress)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=_spawn(), initializer=_init_worker, initargs=(threads,)) as pool:
        pending: dict[Future, dict[str, Any]] = {pool.submit(_run_task, t): t for t in tasks}
        while pending:
            done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            if bar is not None and sys.stderr.isatty():
                bar.refresh()  # the elapsed time keeps moving while the first runs train
            for future in done:
                task = pending.pop(future)
                result = future.result()
                results.append(result)
                if bar is not None:
                    bar.update(1)
                    bar.write(_describe(result, t0))
                # Phase 2: each chain's next loop as soon as the previous one exists.
                if task["kind"] == "train" and task["mode"] == "ambient":
                    next_tasks = [_chain_task(task, result, v, 2) for v in settings["loop_variants"]]
                elif task["kind"] == "loop" and task["loop"] < settings["loops"]:
                    next_tasks = [{**task, "loop": task["loop"] + 1}]
                else:
                    next_tasks = []
                for t in next_tasks:
                    pending[pool.submit(_run_task, t)] = t
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    table = _table(results, corruptions, settings)
    result = DemoResult(run_dir, table, seconds, sorted(results, key=_run_order))
    summary = {
        "config": config,
        "seconds": seconds,
        "cpu_minutes": _cpu_minutes(result),
        "reference": "clean versions of the corrupted samples",
        "table": table,
    }
    write_json(run_dir / "metrics.json", summary)
    write_json(run_dir / "demo.json", {**summary, "runs": result.runs})
    (run_dir / "table.md").write_text(format_table(result, config) + "\n")
    _report(run_dir / "report.png", result, datasets, clean_data, settings)
    return result


def _printer(progress: bool):
    if not progress:
        return lambda *_: None
    return lambda text: print(text, flush=True)


def _bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    # smoothing=0: the rate (hence the ETA) is the average over all finished runs, which are
    # equal in cost; the ETA appears with the first finished run.
    return tqdm(total=total, unit="run", desc="demo", smoothing=0, dynamic_ncols=True)


def _train_task(common: dict[str, Any], corruption: str, mode: str, seed: int, data: str, run_dir: Path) -> dict:
    name = f"clean-seed{seed}" if mode == "clean" else f"{corruption}-{mode}-seed{seed}"
    return {
        **common,
        "kind": "train",
        "corruption": corruption,
        "mode": mode,
        "seed": seed,
        "run_seed": _run_seed(seed),
        "data": data,
        "out": str(run_dir / name),
    }


def _chain_task(ambient_task: dict[str, Any], ambient: dict[str, Any], variant: LoopVariant, loop: int) -> dict:
    return {
        **ambient_task,
        "kind": "loop",
        "mode": variant.key,
        "variant": {"init": variant.init, "rho": variant.rho, "train_on": variant.train_on},
        "row": variant.name,
        "loop": loop,
        "start_model": ambient["denoiser"],
        "out": f"{ambient_task['out']}-{variant.key}",
    }


def _run_seed(seed: int) -> int:
    """Demo seed -> the runs' seed: loop k of a chain trains with run_seed + k - 1, so the
    seeds of different demo seeds never meet."""
    return 1000 * seed


def _run_order(r: dict[str, Any]) -> tuple:
    return (r["corruption"], r["row"], r["seed"], r.get("loop", 1))


def _describe(r: dict[str, Any], t0: float) -> str:
    where = f"loop {r['loop']}" if r["kind"] == "loop" else "      "
    text = (
        f"[demo {time.perf_counter() - t0:5.0f}s] {r['corruption']:>6s} {r['row']:<42s} seed {r['seed']} {where}: "
        f"FD {r['fd']:7.2f}, copies {100 * r['memorisation']:5.1f}%"
    )
    if r.get("data_fd") is not None:
        text += f"; restored data FD {r['data_fd']:6.2f}, MSE {r['data_mse']:.4f}"
    return text


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_task(task: dict[str, Any]) -> dict[str, Any]:
    """One training run in a worker: a baseline or the ambient model (then evaluated), or the
    next loop of a chain (``run_dataloop`` continued by one loop, which evaluates it)."""
    import torch

    t0, cpu0 = time.perf_counter(), time.process_time()
    out = {"corruption": task["corruption"], "seed": task["seed"], "kind": task["kind"], "mode": task["mode"]}
    train_kwargs = {
        "network": task["network"],
        "total_images": task["total_images"],
        "batch_size": task["batch_size"],
        "checkpoint_images": task["total_images"],
        "log_every": 50,
    }
    if task["kind"] == "train":
        from ..data import load_dataset_tensors
        from .evaluate import clean_reference, evaluate_denoiser
        from .train import train

        result = train(
            task["data"], task["out"], mode=task["mode"], seed=task["run_seed"], progress=False, **train_kwargs
        )
        data = load_dataset_tensors(task["data"])
        ref = clean_reference(task["data"], task["clean_data"], data_tensors=data)
        scores = evaluate_denoiser(
            result.denoiser_path,
            ref.images,
            num_samples=task["eval_samples"],
            seed=task["run_seed"],
            train_images=data.images[~ref.corrupt],
            device="cpu",
        )
        out.update(
            row=MODE_LABELS[task["mode"]],
            denoiser=str(result.denoiser_path),
            fd=scores["value"],
            memorisation=scores["memorisation"],
        )
    else:
        from .dataloop import run_dataloop

        variant = task["variant"]
        loop = run_dataloop(
            task["data"],
            task["out"],
            loops=task["loop"],
            init=variant["init"],
            start_model=task["start_model"],
            train_on=variant["train_on"],
            train_kwargs=train_kwargs,
            restore_kwargs={"rho_ambient": variant["rho"]},
            reference=task["clean_data"],
            eval_samples=task["eval_samples"],
            patience=None,  # the demo runs every loop: the curve is the result
            seed=task["run_seed"],
            device="cpu",
            resume=task["loop"] > 2,
            restore_last=True,
            report=False,
            progress=False,
        )
        records = {r["loop"]: r for r in loop.loops}
        last = records[task["loop"]]
        out.update(
            row=task["row"],
            loop=task["loop"],
            denoiser=last["denoiser"],
            fd=last["value"],
            memorisation=last["memorisation"],
            data_fd=last.get("data_value"),
            data_mse=last.get("data_mse"),
            data=last.get("data"),
        )
        if task["loop"] == 2:  # loop 1 (the ambient model) restored by this chain
            first = records[1]
            out["loop1"] = {k: first.get(k) for k in ("data_value", "data_mse", "data")}
    out.update(
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - cpu0,
        threads=torch.get_num_threads(),
    )
    return out


def _stats(values: list[float]) -> dict[str, Any]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def _table(results: list[dict[str, Any]], corruptions: tuple[str, ...], settings: dict[str, Any]) -> dict:
    """Per corruption: baselines (FD, copies), and per chain and loop: FD, copies, restored data FD/MSE."""
    table: dict[str, dict[str, Any]] = {}
    for c in corruptions:
        mine = [r for r in results if r["corruption"] in (c, "shared")]
        baselines: dict[str, Any] = {}
        for mode in (*settings["baselines"], "ambient"):
            runs = sorted((r for r in mine if r["kind"] == "train" and r["mode"] == mode), key=lambda r: r["seed"])
            if runs:
                baselines[MODE_LABELS[mode]] = {
                    **_stats([r["fd"] for r in runs]),
                    "memorisation": sum(r["memorisation"] for r in runs) / len(runs),
                }
        ambient = sorted((r for r in mine if r["kind"] == "train" and r["mode"] == "ambient"), key=lambda r: r["seed"])
        chains: dict[str, list[dict[str, Any]]] = {}
        for variant in settings["loop_variants"]:
            steps = [r for r in mine if r["kind"] == "loop" and r["mode"] == variant.key]
            per_loop = []
            for k in range(1, settings["loops"] + 1):
                if k == 1:
                    runs = ambient
                    data = [
                        r["loop1"]
                        for r in sorted(steps, key=lambda r: r["seed"])
                        if r["loop"] == 2 and r["loop1"].get("data_value") is not None
                    ]
                else:
                    runs = sorted((r for r in steps if r["loop"] == k), key=lambda r: r["seed"])
                    data = [
                        {"data_value": r["data_fd"], "data_mse": r["data_mse"]}
                        for r in runs
                        if r.get("data_fd") is not None
                    ]
                if not runs:
                    continue
                row = {
                    "loop": k,
                    "fd": _stats([r["fd"] for r in runs]),
                    "memorisation": sum(r["memorisation"] for r in runs) / len(runs),
                }
                if data:
                    row["data_fd"] = _stats([d["data_value"] for d in data])
                    row["data_mse"] = _stats([d["data_mse"] for d in data])
                per_loop.append(row)
            chains[variant.name] = per_loop
        table[c] = {"baselines": baselines, "loops": chains}
    return table


def _cell(stats: dict[str, Any] | None, digits: int = 1) -> str:
    if stats is None:
        return "-"
    return f"{stats['mean']:.{digits}f} +- {stats['std']:.{digits}f}"


def format_table(result: DemoResult, config: dict[str, Any]) -> str:
    """Markdown: per corruption, the baselines, then per loop each chain's FD (mean +- std over
    seeds), copies, and the restored data's FD / MSE to the clean versions."""
    lines: list[str] = []
    for c, entry in result.table.items():
        title = (
            f"blur (sigma_B {config['sigma_blur']:g}, sigma_min {config['blur_sigma_min']:g})"
            if c == "blur"
            else f"Gaussian noise (std {config['noise_std']:g} = sigma_min)"
        )
        lines += [f"### {title}", "", "| run | FD_digits | copies |", "|---|---|---|"]
        for row, cell in entry["baselines"].items():
            lines.append(f"| {row} | {_cell(cell)} | {100 * cell['memorisation']:.1f}% |")
        lines.append("")
        chains = list(entry["loops"])
        head = "| loop | " + " | ".join(f"{name}: FD (copies)" for name in chains)
        restoring = [n for n in chains if any("data_fd" in r for r in entry["loops"][n])]
        head += "".join(f" | {name}: restored data FD / MSE" for name in restoring) + " |"
        lines += [head, "|---|" + "---|" * (len(chains) + len(restoring))]
        loops = sorted({r["loop"] for n in chains for r in entry["loops"][n]})
        for k in loops:
            cells = []
            for name in chains:
                r = next((r for r in entry["loops"][name] if r["loop"] == k), None)
                cells.append("-" if r is None else f"{_cell(r['fd'])} ({100 * r['memorisation']:.1f}%)")
            for name in restoring:
                r = next((r for r in entry["loops"][name] if r["loop"] == k), None)
                cells.append(
                    "-"
                    if r is None or "data_fd" not in r
                    else f"{_cell(r['data_fd'])} / {r['data_mse']['mean']:.4f} +- {r['data_mse']['std']:.4f}"
                )
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
    seeds = len(config["seeds"])
    lines.append(
        f"FD_digits to the clean versions of the corrupted images (lower is better), mean +- std over "
        f"{seeds} seed(s); loop 1 is the ambient model; loop k of data (restored data) is the original data "
        f"restored by model k. Copies: share of samples within RMS {_threshold():g} of a clean training image. "
        f"{config['network']}, {config['total_images']:,} images per run (= per loop) at batch "
        f"{config['batch_size']}; wall time {result.seconds / 60:.1f} min; the runs used "
        f"{_cpu_minutes(result):.1f} CPU-minutes ({config['jobs']} worker process(es))."
    )
    return "\n".join(lines)


def _cpu_minutes(result: DemoResult) -> float:
    return sum(r.get("cpu_seconds", 0.0) for r in result.runs) / 60


def _threshold() -> float:
    from ..eval import DIGITS_COPY_THRESHOLD

    return DIGITS_COPY_THRESHOLD


def _report(path: Path, result: DemoResult, datasets: dict[str, str], clean_data: str, settings: dict) -> None:
    """Per corruption: model FD and restored-data FD vs loop (each chain, the baselines as
    lines), and a grid of corrupt / restored / clean / generated digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ..data import load_dataset_tensors
    from ..restoration import load_denoiser
    from .evaluate import generate
    from .report import image_grid

    corruptions = list(result.table)
    fig, axes = plt.subplots(
        3, len(corruptions), figsize=(8 * len(corruptions), 14), squeeze=False, height_ratios=(3, 1.4, 2.6)
    )
    for j, c in enumerate(corruptions):
        entry = result.table[c]
        ax = axes[1, j]
        for i, (name, rows) in enumerate(entry["loops"].items()):
            ax.plot([r["loop"] for r in rows], [100 * r["memorisation"] for r in rows], "o-", color=f"C{i}", label=name)
        ax.set_xticks(range(1, settings["loops"] + 1))
        ax.set_xlabel("loop")
        ax.set_ylabel("copies of the 54 clean images (%)")
        ax.legend(fontsize=7)
        ax = axes[0, j]
        for i, (name, rows) in enumerate(entry["loops"].items()):
            xs = [r["loop"] for r in rows]
            ax.errorbar(
                xs, [r["fd"]["mean"] for r in rows], yerr=[r["fd"]["std"] for r in rows], fmt="o-", color=f"C{i}",
                capsize=3, label=f"{name}: model",
            )  # fmt: skip
            data_rows = [r for r in rows if "data_fd" in r]
            if data_rows:
                ax.errorbar(
                    [r["loop"] for r in data_rows], [r["data_fd"]["mean"] for r in data_rows],
                    yerr=[r["data_fd"]["std"] for r in data_rows], fmt="s--", color=f"C{i}", capsize=3, alpha=0.7,
                    label=f"{name}: restored data",
                )  # fmt: skip
        for i, (row, cell) in enumerate(entry["baselines"].items()):
            if not row.startswith("ambient"):
                ax.axhline(
                    cell["mean"], color=f"C{5 + i}", ls=":", label=f"{row} ({100 * cell['memorisation']:.0f}% copies)"
                )
        ax.set_xlabel("loop (1 = the ambient model; one training budget per loop)")
        ax.set_ylabel("FD_digits to the clean versions (lower is better)")
        ax.set_yscale("log")
        ax.set_xticks(range(1, settings["loops"] + 1))
        ax.set_title(f"{c}: model and restored data per loop (mean +- std over {len(settings['seeds'])} seeds)")
        ax.legend(fontsize=7)

        data = load_dataset_tensors(datasets[c])
        clean = load_dataset_tensors(clean_data)
        corrupt = torch.nonzero(data.sigma_min > 0).flatten()[:12]
        grid_rows = [data.images[corrupt]]
        labels = ["corrupt"]
        seed0 = min(settings["seeds"])
        steps = [r for r in result.runs if r["corruption"] == c and r["kind"] == "loop" and r["seed"] == seed0]
        last_loop = [r for r in steps if r.get("data") and r["loop"] == settings["loops"]]
        if last_loop:
            grid_rows.append(load_dataset_tensors(last_loop[0]["data"]).images[corrupt])
            labels.append(f"restored (loop {settings['loops']})")
        grid_rows.append(clean.images[data.ids[corrupt]])
        labels.append("clean version")
        models = [r for r in result.runs if r["corruption"] == c and r["kind"] == "train" and r["mode"] == "ambient"]
        models += [r for r in steps if r["loop"] == settings["loops"]]
        for run in [r for r in models if r["seed"] == seed0]:
            grid_rows.append(generate(load_denoiser(run["denoiser"]), 12, tuple(data.images.shape[1:]), seed=7))
            labels.append("ambient samples" if run["kind"] == "train" else f"{run['row'].split(' (')[0]} samples")
        ax = axes[2, j]
        ax.imshow(image_grid(grid_rows).numpy(), interpolation="nearest")
        h = data.images.shape[-2] + 1
        ax.set_yticks([1 + h * i + h / 2 for i in range(len(labels))])
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xticks([])
    fig.suptitle(f"ambient-fast demo ({result.seconds / 60:.1f} min)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
