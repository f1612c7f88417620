"""The Ambient Dataloop orchestrator (SPEC 6): train, evaluate, restore, re-annotate, repeat.

::

    data_0 = the original annotated dataset (never modified)
    for k in 1..L:
        model_k  = train(init = model_{k-1} or scratch, data_{k-1})   -> loop-k/train/
        metric_k = evaluate(model_k)                                    -> loop-k/metrics.json
        stop when the metric has not improved for `patience` loops (the "madness regime")
        data_k   = restore(model_k, data_0)  (new sigma_min = sigma_min / rho)  -> loop-k/data/
        data_metric_k = data_k's corrupt samples vs their clean versions (FD and MSE)
        optionally re-annotate data_k with the noisy-input classifier

``train_on="original"`` is the same-compute control: every loop fine-tunes (or retrains) on
data_0 with the same budget and nothing is restored, so a gain of the loop over it is the
restoration's, not the extra training's.

The metric's reference is :func:`~ambient_fast.loops.evaluate.clean_reference`: the clean
versions of the corrupted samples where the reference dataset has them (same keys), else the
whole reference; ``metrics.json`` names which.

Every stage's output lives in the run folder, side by side; ``state.json`` records which
stages finished, so a killed run continues (``resume=True``) from the last finished stage.
Unfinished stages pick up their own partial work: training from its last checkpoint,
restoration from the samples already written. The orchestrator only wires components.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..runtime import check_unchanged, init_runtime, print0, read_json, read_jsonl, write_json

__all__ = ["LoopResult", "madness_start", "run_dataloop", "stop_rule"]

STATE_FILE = "state.json"


@dataclass
class LoopResult:
    """What :func:`run_dataloop` produced."""

    run_dir: Path
    loops: list[dict[str, Any]]  # per finished loop: loop, value, memorisation, paths, timings
    best_loop: int | None  # loop with the best metric (None when not evaluated)
    stopped_early: bool  # stopped because the metric worsened for `patience` loops
    madness_from: int | None  # first loop of the worsening run that stopped it (None: no stop)
    reference: str | None  # what the metric was computed against
    metrics_path: Path  # run-level metrics.json
    report_path: Path | None  # report.png


def run_dataloop(
    data: str | Path,
    run_dir: str | Path,
    *,
    loops: int = 2,  # number of train -> restore rounds
    init: Literal["scratch", "previous"] = "scratch",  # loop k starts from scratch (anchors) or loop k-1's EMA
    start_model: str | Path | None = None,  # use this denoiser as model_1 instead of training it
    train_on: Literal["restored", "original"] = "restored",  # "original": the same-compute control (no restoration)
    train_kwargs: dict[str, Any] | None = None,  # ambient_fast.loops.train options
    restore_kwargs: dict[str, Any] | None = None,  # ambient_fast.restoration.restore_dataset options
    reannotate: Literal[
        "restore", "classifier"
    ] = "restore",  # new sigma_min: restoration's sigma_min/rho, or classifier
    annotate_kwargs: dict[str, Any] | None = None,  # annotate_classifier options (reannotate="classifier")
    reference: str | Path | None = None,  # clean reference dataset for the metric (None: no evaluation)
    metric: Literal["fd_digits", "fid"] = "fd_digits",  # Frechet distance to the reference
    eval_samples: int = 2000,  # generated samples per evaluation
    eval_steps: int = 18,  # sampler grid points (Heun, NFE 2*steps-1)
    memorisation: bool = True,  # also report the share of samples copying a clean training image
    patience: int | None = 2,  # stop after this many loops without improvement (None: never stop)
    seed: int = 0,  # training / evaluation / restoration seed
    device: str = "auto",  # "auto", "cpu", "cuda", ...
    resume: bool = False,  # continue a killed run in run_dir
    restore_last: bool = True,  # also restore with the last loop's model (data_L, for inspection)
    report: bool = True,  # write report.png
    progress: bool = True,  # progress bars
) -> LoopResult:
    """Run SPEC 6 on ``data`` into ``run_dir`` (see module docstring).

    Per loop, ``metrics.json`` and :attr:`LoopResult.loops` hold ``value`` (the model's
    metric), ``memorisation`` (share of samples copying a clean training image) and, when the
    reference holds the clean versions of the corrupted samples, ``data_value`` / ``data_mse``:
    the restored data's Frechet distance and mean squared error to them.
    """
    config = dict(locals())
    from ..data import load_dataset_tensors
    from .evaluate import clean_reference, data_scores, evaluate_denoiser
    from .train import train

    config["data"], config["run_dir"] = str(data), str(run_dir)
    config["reference"] = None if reference is None else str(reference)
    config["start_model"] = None if start_model is None else str(start_model)
    _check_options(config)
    dist = init_runtime(device)
    run_dir, data = Path(run_dir), Path(data)
    state = _open_state(run_dir, config, resume, dist.is_main)
    original = load_dataset_tensors(data)
    ref = clean_reference(data, reference, data_tensors=original) if reference is not None else None
    clean_train = original.images[original.sigma_min == 0] if memorisation else None
    restore_each_loop = train_on == "restored"

    say = print0 if progress else (lambda *_: None)
    if ref is not None:
        say(f"[loop] {metric} against {ref.description}")
    history: list[dict[str, Any]] = list(state["loops"])
    current: dict[str, Any] | None = state.get("current")
    train_data = data if not history or not restore_each_loop else Path(history[-1].get("data", data))
    stopped = state["stopped_early"]

    def finish(record: dict[str, Any], stage: str) -> None:
        record["stages"].append(stage)
        if dist.is_main:
            write_json(run_dir / STATE_FILE, {"loops": history, "current": record, "stopped_early": False})

    for k in range(len(history) + 1, loops + 1):
        if stopped:
            break
        loop_dir = run_dir / f"loop-{k}"
        record = (
            current
            if current is not None and current["loop"] == k
            else {"loop": k, "trained_on": str(train_data), "stages": []}
        )

        # Train (an interrupted stage resumes from its own last checkpoint).
        if k == 1 and start_model is not None and "train" not in record["stages"]:
            record.update(denoiser=str(start_model), trained_on="(given: start_model)")
            finish(record, "train")
        if "train" not in record["stages"]:
            t0 = time.perf_counter()
            say(f"[loop {k}/{loops}] train on {train_data}")
            previous = history[-1]["denoiser"] if history and init == "previous" else None
            kwargs = {**(train_kwargs or {}), "seed": seed + k - 1}
            if k > 1:  # a restored version says itself whether it is stored noisy (sigma_out > 0)
                kwargs["nature_noise"] = "auto"
            result = train(
                train_data,
                loop_dir / "train",
                **kwargs,
                init=previous,
                device=device,
                resume=True,
                progress=progress,
            )
            record.update(
                denoiser=str(result.denoiser_path),
                train_seconds=time.perf_counter() - t0,
                images_per_second=result.images_per_second,
                final_loss=result.log[-1]["loss"] if result.log else None,
            )
            finish(record, "train")

        # Evaluate.
        if ref is not None and "evaluate" not in record["stages"]:
            t1 = time.perf_counter()
            if dist.is_main:
                scores = evaluate_denoiser(
                    record["denoiser"],
                    ref.images,
                    metric=metric,
                    num_samples=eval_samples,
                    steps=eval_steps,
                    seed=seed,
                    train_images=clean_train,
                    device=dist.device,
                )
                record.update(
                    value=scores["value"],
                    memorisation=scores.get("memorisation"),
                    eval_seconds=time.perf_counter() - t1,
                )
                write_json(loop_dir / "metrics.json", {**record, "metric": metric, "reference": ref.description})
                say(f"[loop {k}/{loops}] {metric} = {scores['value']:.3f}")
            record = dist.broadcast(record)
            finish(record, "evaluate")
        stopped = stop_rule([r.get("value") for r in history + [record]], patience)

        # Restore the original data with model_k (skipped once the run stops, and in the control).
        restore_now = restore_each_loop and not stopped and (k < loops or restore_last)
        if restore_now and "restore" not in record["stages"]:
            t2 = time.perf_counter()
            restored = loop_dir / ("restored" if reannotate == "classifier" else "data")
            say(f"[loop {k}/{loops}] restore {data} -> {restored}")
            _restore(Path(record["denoiser"]), data, restored, restore_kwargs or {}, seed, dist.device, progress)
            record.update(data=str(restored), restore_seconds=time.perf_counter() - t2)
            if ref is not None and ref.clean_versions is not None and dist.is_main:
                scores = data_scores(
                    load_dataset_tensors(restored).images[ref.corrupt],
                    ref.clean_versions,
                    metric=metric,
                    device=dist.device,
                )
                record.update(data_value=scores["fd"], data_mse=scores["mse"])
                say(f"[loop {k}/{loops}] restored data: {metric} = {scores['fd']:.3f}, MSE = {scores['mse']:.4f}")
            record = dist.broadcast(record)
            finish(record, "restore")
        if restore_now and reannotate == "classifier" and "annotate" not in record["stages"]:
            from .annotate import annotate_classifier

            say(f"[loop {k}/{loops}] re-annotate {record['data']} with the classifier -> {loop_dir / 'data'}")
            if dist.is_main:
                reader_options = ("cache", "cache_budget_bytes", "stream")
                reader = {name: v for name, v in (train_kwargs or {}).items() if name in reader_options}
                annotate_classifier(
                    record["data"],
                    loop_dir / "data",
                    **{"seed": seed, **reader, **(annotate_kwargs or {})},  # read as training reads
                    device=str(dist.device),
                    progress=progress,
                )
            dist.barrier()
            record.update(data=str(loop_dir / "data"))
            finish(record, "annotate")
        if "data" in record:
            train_data = Path(record["data"])
        history.append(record)
        current = None
        if dist.is_main:
            write_json(run_dir / STATE_FILE, {"loops": history, "current": None, "stopped_early": stopped})

    best = _best_loop(history)
    madness = madness_start([r.get("value") for r in history], patience) if stopped else None
    metrics_path = run_dir / "metrics.json"
    report_path = run_dir / "report.png" if report else None
    reference_text = ref.description if ref is not None else None
    if dist.is_main:
        write_json(
            metrics_path,
            {
                "metric": metric if ref is not None else None,
                "reference": reference_text,
                "train_on": train_on,
                "loops": history,
                "best_loop": best,
                "stopped_early": stopped,
                "madness_from": madness,
            },
        )
        if report_path is not None:
            _write_report(report_path, run_dir, history, original, ref, metric, best)
    return LoopResult(run_dir, history, best, stopped, madness, reference_text, metrics_path, report_path)


def _check_options(config: dict[str, Any]) -> None:
    checks = [
        ("loops", config["loops"] >= 1, ">= 1"),
        ("init", config["init"] in ("scratch", "previous"), "'scratch' or 'previous'"),
        ("reannotate", config["reannotate"] in ("restore", "classifier"), "'restore' or 'classifier'"),
        ("metric", config["metric"] in ("fd_digits", "fid"), "'fd_digits' or 'fid'"),
        ("eval_samples", config["eval_samples"] >= 2, ">= 2"),
        ("eval_steps", config["eval_steps"] >= 1, ">= 1"),
        ("patience", config["patience"] is None or config["patience"] >= 1, ">= 1 or None"),
        ("train_on", config["train_on"] in ("restored", "original"), "'restored' or 'original'"),
    ]
    for name, ok, rule in checks:
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {config[name]!r}")
    for name in ("train_kwargs", "restore_kwargs", "annotate_kwargs"):
        reserved = {"seed", "device", "resume", "progress", "init"} & set(config[name] or {})
        if reserved:
            raise ValueError(f"{name} may not set {sorted(reserved)}: they are run_dataloop options")


def _open_state(run_dir: Path, config: dict[str, Any], resume: bool, is_main: bool) -> dict[str, Any]:
    """Load the stage record of a run being resumed, or start one (rank 0 writes)."""
    state_path = run_dir / STATE_FILE
    if resume:
        if not (run_dir / "config.json").exists():
            raise FileNotFoundError(f"cannot resume: {run_dir} has no config.json (not a loop run folder)")
        saved = read_json(run_dir / "config.json")
        check_unchanged(saved, config, may_change=("resume", "progress", "device", "loops"), where=str(run_dir))
        state = read_json(state_path) if state_path.exists() else {"loops": [], "current": None, "stopped_early": False}
        if is_main:
            write_json(run_dir / "config.json", config)
        return state
    if state_path.exists():
        raise FileExistsError(f"{run_dir} already holds a loop run; pass resume=True (--resume) to continue it")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", config)
    return {"loops": [], "current": None, "stopped_early": False}


def stop_rule(values: list[float | None], patience: int | None) -> bool:
    """True when the last ``patience`` loops all failed to beat the best loop before them.

    ``values``: the metric per loop so far (lower is better; None: not evaluated, never
    stops). The default ``patience = 2`` tolerates a one-loop dip: a loop that is worse
    than the best so far does not stop the run if the next one improves again.
    """
    if patience is None or len(values) <= patience or any(v is None for v in values):
        return False
    best_before = min(values[:-patience])
    return all(v >= best_before for v in values[-patience:])


def madness_start(values: list[float], patience: int | None) -> int | None:
    """The 1-based loop where the "madness regime" starts when :func:`stop_rule` fires:
    the first loop after the best one of those before the last ``patience`` loops
    (from there on no loop beat it); None when the rule does not fire."""
    if not stop_rule(values, patience):
        return None
    head = values[: len(values) - patience]
    return head.index(min(head)) + 2


def _best_loop(history: list[dict[str, Any]]) -> int | None:
    scored = [(r["value"], r["loop"]) for r in history if r.get("value") is not None]
    return min(scored)[1] if scored else None


def _restore(
    denoiser_path: Path, src: Path, dst: Path, kwargs: dict[str, Any], seed: int, device: torch.device, progress: bool
) -> None:
    from ..data.nature_noise import resolve_start_noise
    from ..restoration import load_denoiser, restore_dataset

    # Data stored noisy at its sigma_min is already the start state (the anchors' npy case);
    # an explicit start_noise in restore_kwargs is checked against the manifest.
    options = dict(kwargs)
    options["start_noise"], _ = resolve_start_noise(src, options.get("start_noise"))
    denoiser = load_denoiser(denoiser_path, device=device)
    restore_dataset(denoiser, src, dst, **{"seed": seed, **options}, progress=progress)


def _write_report(
    path: Path, run_dir: Path, history: list[dict[str, Any]], original, ref, metric: str, best: int | None
) -> None:
    from ..data import load_dataset_tensors
    from .report import plot_report

    corrupt = torch.nonzero(original.sigma_min > 0).flatten()[:12]
    rows: dict[str, torch.Tensor] = {"corrupt": original.images[corrupt]}
    after: dict[str, torch.Tensor] = {}
    for r in history:
        if "data" in r:
            restored = load_dataset_tensors(r["data"])
            after[f"loop {r['loop']}"] = restored.sigma_min
            rows[f"restored (loop {r['loop']})"] = restored.images[corrupt]
    if ref is not None and ref.clean_versions is not None:
        rows["clean"] = ref.clean_versions[: len(corrupt)]
    curves = {
        f"loop {r['loop']}": [(x["images"], x["loss"]) for x in read_jsonl(Path(r["denoiser"]).parent / "log.jsonl")]
        for r in history
        if "train_seconds" in r
    }
    plot_report(
        path,
        metric_name=metric,
        loops=history,
        loss_curves=curves,
        sigma_min_before=original.sigma_min,
        sigma_min_after=after,
        grid_rows=rows,
        best_loop=best,
        title=run_dir.name,
    )
