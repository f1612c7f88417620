"""Training, sigma_min annotation, evaluation and the Ambient Dataloops orchestrator.

Public API (SPEC sections in brackets):

Training [2, 3] (:mod:`.train`)
    ``train(data, run_dir, *, mode="ambient"|"contraction"|"plain"|"clean", network, ...,
    total_images, batch_size, lr, lr_rampup_images, ema_halflife_images, grad_clip,
    precision, allow_tf32, compile, checkpoint_images, seed, resume) -> TrainResult``:
    EDM-style training with the ambient loss and noise-level-first batches, Adam + lr
    ramp-up, EMA (half-life in images), nan_to_num + grad-norm clip, autocast, exact
    resume from ``training-state.safetensors``, DDP under torchrun (NCCL / gloo).
    ``load_training_state(path)``, ``detect_nature_noise(data)``, ``network_kwargs_for``,
    ``TRAIN_MODES``.

Annotation [2] (:mod:`.annotate`)
    ``fixed_sigma_min(corruption, level)``, ``annotate_fixed(src, dst, sigma_min)``,
    ``annotate_classifier(src, dst, ...) -> ClassifierAnnotation`` (Ambient-o; reads through
    the training input in a ``ClassifierPlan``'s order), and its pieces ``train_classifier``
    (over a stream of batches), ``classifier_probabilities`` (batched over samples x sigmas
    x trials), ``smooth_along_sigma``, ``crossing_sigmas``, ``annotation_sigmas``.

Evaluation (:mod:`.evaluate`)
    ``generate(denoiser, n, shape, ...)`` (EDM Heun, per-sample seeds),
    ``evaluate_denoiser(denoiser, reference, metric="fd_digits"|"fid", ...)``.

The loop [6] (:mod:`.dataloop`)
    ``run_dataloop(data, run_dir, *, loops, init="scratch"|"previous", start_model,
    train_on="restored"|"original", train_kwargs, restore_kwargs,
    reannotate="restore"|"classifier", reference, metric, patience=2, resume) -> LoopResult``:
    train -> evaluate -> restore -> re-annotate per loop (``train_on="original"``: the
    same-compute control), the restored data's FD/MSE to the clean versions, early stop with
    ``madness_from``, best loop, ``metrics.json`` and ``report.png``; resumable by stage.
    ``stop_rule``, ``madness_start``; ``evaluate.clean_reference`` (the metric's reference).

The demo (:mod:`.demo`)
    ``run_demo(run_dir, *, preset="default"|"quick"|"study", ...) -> DemoResult``,
    ``DEMO_PRESETS``, ``DEMO_MINUTES``, ``LoopVariant``, ``format_table``.

Run folders, ranks, JSON records and the resume guard live in :mod:`ambient_fast.runtime`;
reports (:mod:`.report`): ``plot_report``.
"""

from .annotate import (
    ClassifierAnnotation,
    ClassifierPlan,
    annotate_classifier,
    annotate_fixed,
    annotation_sigmas,
    classifier_probabilities,
    crossing_sigmas,
    fixed_sigma_min,
    smooth_along_sigma,
    train_classifier,
)
from .dataloop import LoopResult, run_dataloop
from .demo import DEMO_PRESETS, DemoResult, LoopVariant, run_demo
from .evaluate import evaluate_denoiser, generate
from .train import TRAIN_MODES, TrainResult, detect_nature_noise, load_training_state, network_kwargs_for, train

__all__ = [
    "DEMO_PRESETS",
    "TRAIN_MODES",
    "ClassifierAnnotation",
    "ClassifierPlan",
    "DemoResult",
    "LoopResult",
    "LoopVariant",
    "TrainResult",
    "annotate_classifier",
    "annotate_fixed",
    "annotation_sigmas",
    "classifier_probabilities",
    "crossing_sigmas",
    "detect_nature_noise",
    "evaluate_denoiser",
    "fixed_sigma_min",
    "generate",
    "load_training_state",
    "network_kwargs_for",
    "run_dataloop",
    "run_demo",
    "smooth_along_sigma",
    "train",
    "train_classifier",
]
