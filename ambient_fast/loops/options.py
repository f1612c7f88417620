"""Validated command-line options shared by the ``train``, ``loop`` and ``demo`` commands.

Every option is checked by its argparse ``type`` (so the error names the option, e.g.
``argument --lr: must be > 0, got -1``); cross-option rules are checked by
:func:`check_train_args` and reported through ``parser.error``, also naming the options.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .train import TRAIN_MODES, train_defaults

__all__ = [
    "positive_int",
    "nonnegative_int",
    "positive_float",
    "nonnegative_float",
    "float_above",
    "float_in",
    "json_object",
    "existing_dir",
    "add_train_arguments",
    "train_kwargs_from_args",
    "check_train_args",
    "dump_dry_run",
]


def _number(kind: type, rule: str, ok: Callable[[float], bool]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if isinstance(value, float) and math.isnan(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {rule}"
    return parse


positive_int = _number(int, "> 0", lambda v: v > 0)
nonnegative_int = _number(int, ">= 0", lambda v: v >= 0)
positive_float = _number(float, "> 0 and finite", lambda v: 0 < v < math.inf)
nonnegative_float = _number(float, ">= 0 and finite", lambda v: 0 <= v < math.inf)


def float_above(low: float) -> Callable[[str], float]:
    """A finite float ``> low``."""
    return _number(float, f"> {low:g} and finite", lambda v: low < v < math.inf)


def float_in(low: float, high: float) -> Callable[[str], float]:
    """A float in the closed interval ``[low, high]``."""
    return _number(float, f"in [{low:g}, {high:g}]", lambda v: low <= v <= high)


def json_object(text: str) -> dict[str, Any]:
    """A JSON object given inline (``'{"hidden": 256}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def existing_dir(text: str) -> Path:
    """An existing folder."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return path


def add_train_arguments(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """Add the options of :func:`ambient_fast.loops.train` (defaults from its signature)."""
    d = train_defaults()
    g = parser.add_argument_group("training")

    def add(flag: str, **kw: Any) -> None:
        if flag.lstrip("-").replace("-", "_") not in skip:
            g.add_argument(flag, **kw)

    add("--mode", choices=TRAIN_MODES, default=d["mode"], help="training mode (default: %(default)s)")
    add("--network", default=d["network"], help="network name for ambient_fast.nn.build_network (default: %(default)s)")
    add(
        "--network-kwargs",
        type=json_object,
        default=None,
        metavar="JSON",
        help="extra network options as a JSON object",
    )
    add("--use-labels", action="store_true", help="class-conditional on the dataset's labels")
    add(
        "--total-images",
        type=positive_int,
        default=d["total_images"],
        metavar="N",
        help="training length in images (default: %(default)s)",
    )
    add(
        "--batch-size",
        type=positive_int,
        default=d["batch_size"],
        metavar="N",
        help="global batch (default: %(default)s)",
    )
    add("--lr", type=positive_float, default=d["lr"], help="Adam learning rate (default: %(default)s)")
    add(
        "--lr-rampup-images",
        type=nonnegative_int,
        default=d["lr_rampup_images"],
        metavar="N",
        help="linear lr ramp-up (default: %(default)s)",
    )
    add(
        "--ema-halflife-images",
        type=nonnegative_int,
        default=d["ema_halflife_images"],
        metavar="N",
        help="EMA half-life in images (default: %(default)s)",
    )
    add(
        "--grad-clip",
        type=nonnegative_float,
        default=d["grad_clip"],
        help="gradient-norm clip, 0 = off (default: %(default)s)",
    )
    add(
        "--loss-reduction",
        choices=("sum", "mean"),
        default=d["loss_reduction"],
        help="over elements, then mean over the batch (default: %(default)s)",
    )
    add(
        "--P-mean",
        dest="P_mean",
        type=float,
        default=d["P_mean"],
        help="log-normal training sigma mean (default: %(default)s)",
    )
    add(
        "--P-std",
        dest="P_std",
        type=positive_float,
        default=d["P_std"],
        help="log-normal training sigma std (default: %(default)s)",
    )
    add(
        "--s-max",
        type=float_above(1.0),
        default=None,
        help=f"eligibility sigma > sqrt(s_max/(s_max-1)) sigma_min (default: {d['s_max']})",
    )
    add(
        "--buffer",
        type=nonnegative_float,
        default=d["buffer"],
        help="additive eligibility sigma > sigma_min + buffer instead of --s-max",
    )
    add(
        "--nature-noise",
        choices=("auto", "fixed", "stored"),
        default=d["nature_noise"],
        help="fixed: add frozen per-sample noise at sigma_min; stored: data already noisy; auto: from the "
        "dataset manifest (default: %(default)s)",
    )
    add(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=d["precision"],
        help="autocast dtype (default: %(default)s)",
    )
    add("--allow-tf32", action="store_true", help="allow TF32 matmuls on CUDA (default: off, as the anchors)")
    add(
        "--compile",
        choices=("auto", "on", "off"),
        default=d["compile"],
        help="torch.compile the denoiser; auto = CUDA only (default: %(default)s)",
    )
    add(
        "--checkpoint-images",
        type=positive_int,
        default=d["checkpoint_images"],
        metavar="N",
        help="write the training state every N images (default: %(default)s)",
    )
    add(
        "--log-every",
        type=positive_int,
        default=d["log_every"],
        metavar="STEPS",
        help="log every this many steps (default: %(default)s)",
    )
    add("--seed", type=nonnegative_int, default=d["seed"], help="seed (default: %(default)s)")
    add("--device", default=d["device"], help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)")


def check_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-option rules (``parser.error`` names the options)."""
    if getattr(args, "buffer", None) is not None and getattr(args, "s_max", None) is not None:
        parser.error("argument --buffer: not allowed with --s-max (choose one eligibility rule)")
    device = getattr(args, "device", "auto")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        parser.error(f"argument --device: expected auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"argument --device: {device} requested but CUDA is not available")


def train_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`ambient_fast.loops.train` keyword arguments present in ``args``
    (``init``, ``resume`` and ``progress`` are the commands' own business)."""
    names = set(train_defaults()) - {"init", "resume", "progress"}
    kwargs = {k: v for k, v in vars(args).items() if k in names}
    if kwargs.get("s_max", 0) is None:
        del kwargs["s_max"]
    return kwargs


def dump_dry_run(what: str, config: dict[str, Any]) -> None:
    """Print what a command would do, and that nothing was written."""
    print(f"dry run: would {what} with")
    print(json.dumps(config, indent=2, default=str))
    print("dry run: nothing was written")
