"""Drop-in compatibility layer for EDM / Ambient-o / Ambient Dataloops codebases.

Switching an EDM-based training or sampling script to ambient_fast changes imports, not
numbers (see ``docs/switching_from_edm.md``):

- :class:`EDMAmbientLoss`: EDM's ``loss_fn(net=, images=, labels=, augment_pipe=)`` convention
  with the anchors' ambient loss (per-element ``(B, C, H, W)`` or fused per-sample ``(B,)``),
  optional EDM2 uncertainty weighting (:class:`SigmaLogVariance`); ``.terms()`` also returns
  the tensors the anchors' loop logs (:class:`LossTerms`); ``stored_noisy`` for ``/npy`` data.
- :class:`AmbientEDMLoss`: the anchors' own ``AmbientEDMLoss`` call and returns.
- :func:`nature_sigma`: the anchors' ``sigma_tn`` rules (Dataloops, Ambient-o pixel, EDM2).
- :func:`edm_sampler`, :class:`StackedRandomGenerator`: EDM ``generate.py``, same arguments,
  same bits (float64 churn, the reference step ops by default).
- :func:`edm_restorer`, :func:`restore_with_annotations`: Dataloops ``restore.py``, with its
  dtypes (``arithmetic="anchor"``, same bits) or the exact float64 grid.
- :func:`read_annotations`, :func:`write_annotations`, :func:`classifier_sigma_min`,
  :func:`crop_sigma_max`, :func:`annotation_arrays`: the anchors' ``annotations.jsonl``.
- :class:`InfiniteSampler` + :class:`WithSigma`: the anchors' sigma-first scan of EDM's
  windowed shuffled order, as ``(index, sigma)`` pairs instead of their shared sigma dict; :func:`anchor_nature_noise`,
  :func:`open_anchor_dataset`: their frozen noise and their dataset folders.
"""

from .annotations import (
    CROP_PATCH_TO_SIGMA_MAX,
    Annotation,
    annotation_arrays,
    classifier_sigma_min,
    crop_sigma_max,
    ewm_mean,
    read_annotations,
    read_sigmas,
    write_annotations,
)
from .data import InfiniteSampler, WithSigma, anchor_nature_noise, open_anchor_dataset
from .generate import StackedRandomGenerator, edm_sampler
from .loss import (
    AmbientEDMLoss,
    EDMAmbientLoss,
    LossTerms,
    SigmaLogVariance,
    ambient_elementwise_loss,
    nature_sigma,
)
from .restore import edm_restorer, restore_with_annotations

__all__ = [
    "CROP_PATCH_TO_SIGMA_MAX",
    "AmbientEDMLoss",
    "Annotation",
    "EDMAmbientLoss",
    "InfiniteSampler",
    "LossTerms",
    "SigmaLogVariance",
    "StackedRandomGenerator",
    "WithSigma",
    "anchor_nature_noise",
    "ambient_elementwise_loss",
    "annotation_arrays",
    "classifier_sigma_min",
    "crop_sigma_max",
    "edm_restorer",
    "edm_sampler",
    "ewm_mean",
    "nature_sigma",
    "open_anchor_dataset",
    "read_annotations",
    "read_sigmas",
    "restore_with_annotations",
    "write_annotations",
]
