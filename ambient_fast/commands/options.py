"""The shared argparse layer of the commands: one numeric-type factory, JSON, paths, the
training options (``train``, ``loop``) and the dry-run printout.

Every option is checked by its argparse ``type`` (so the error names the option, e.g.
``argument --lr: must be > 0, got -1``); cross-option rules are checked by
:func:`check_train_args` and reported through ``parser.error``, also naming the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..loops.train import TRAIN_MODES, train_defaults

__all__ = [
    "number",
    "positive_int",
    "nonnegative_int",
    "positive_float",
    "nonnegative_float",
    "float_above",
    "float_in",
    "json_object",
    "existing_dir",
    "byte_size",
    "check_network",
    "open_dataset_arg",
    "add_train_arguments",
    "add_input_arguments",
    "check_input_args",
    "check_training_data",
    "train_kwargs_from_args",
    "check_train_args",
    "dump_dry_run",
    "output_state",
]


def number(
    kind: type = float,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> Callable[[str], Any]:
    """An argparse ``type``: an ``int`` or finite ``float`` within the given bounds.

    ``number(int, above=0)`` accepts ``1, 2, ...``; ``number(float, at_least=0, at_most=1)``
    the closed interval. The error names the rule: ``must be > 0, got -1``.
    """

    def show(bound: float) -> str:
        return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e15 else f"{bound:g}"

    if at_least is not None and at_most is not None and above is None and below is None:
        rule = f"in [{show(at_least)}, {show(at_most)}]"
    else:
        bounds = (("> ", above), (">= ", at_least), ("<= ", at_most), ("< ", below))
        rule = " and ".join(f"{op}{show(bound)}" for op, bound in bounds if bound is not None) or "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        ok = math.isfinite(value) and all(
            (
                above is None or value > above,
                at_least is None or value >= at_least,
                at_most is None or value <= at_most,
                below is None or value < below,
            )
        )
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {rule}{'' if kind is int else ' and finite'}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {rule}"
    return parse


positive_int = number(int, above=0)
nonnegative_int = number(int, at_least=0)
positive_float = number(float, above=0)
nonnegative_float = number(float, at_least=0)


def float_above(low: float) -> Callable[[str], float]:
    """A finite float ``> low``."""
    return number(float, above=low)


def float_in(low: float, high: float) -> Callable[[str], float]:
    """A float in the closed interval ``[low, high]``."""
    return number(float, at_least=low, at_most=high)


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_size(text: str) -> int:
    """A size in bytes: ``4096``, ``512M``, ``4G`` (binary units, optional trailing ``B``)."""
    raw = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    try:
        value = float(raw[: len(raw) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 4096, 512M or 4G, got {text!r}") from None
    if not (0 <= value < math.inf):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return int(value)


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


def open_dataset_arg(parser: argparse.ArgumentParser, flag: str, path: Path) -> Any:
    """The dataset at ``path`` (``ambient_fast.data.open_dataset``), or ``parser.error``
    naming ``flag`` and what is wrong with it."""
    from ..data import DatasetError, open_dataset

    try:
        return open_dataset(path)
    except (DatasetError, FileNotFoundError) as err:
        parser.error(f"argument {flag}: {err}")


def check_network(
    parser: argparse.ArgumentParser,
    name: str,
    kwargs: dict[str, Any] | None,
    sample_shape: tuple[int, ...] | None = None,
) -> None:
    """``parser.error`` naming ``--network`` (an unknown name lists the known ones; with
    ``sample_shape``, a network that does not fit those samples) or ``--network-kwargs``
    (unknown keys list the accepted ones; bad values say why)."""
    from ..nn import MLP_PRESETS, NETWORK_PRESETS, UNET_PRESETS, MLPConfig, UNetConfig

    known = (*NETWORK_PRESETS, "mlp", "unet")
    if name not in known:
        parser.error(f"argument --network: unknown network {name!r}; known: {', '.join(known)}")
    family = MLPConfig if name.startswith("mlp") else UNetConfig
    fields = {f.name for f in dataclasses.fields(family)}
    unknown = sorted(set(kwargs or {}) - fields)
    if unknown:
        parser.error(
            f"argument --network-kwargs: unknown key(s) {', '.join(map(repr, unknown))} for {name!r}; "
            f"accepted: {', '.join(sorted(fields))}"
        )
    base = {**MLP_PRESETS, **UNET_PRESETS}.get(name, family())
    try:
        dataclasses.replace(base, **(kwargs or {}))
    except (TypeError, ValueError) as err:
        parser.error(f"argument --network-kwargs: {err}")
    if sample_shape is not None:
        from ..loops.train import network_kwargs_for

        try:
            network_kwargs_for(name, tuple(sample_shape), **(kwargs or {}))
        except ValueError as err:
            parser.error(f"argument --network: {err}")


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
    add_input_arguments(g, skip=skip)
    add("--seed", type=nonnegative_int, default=d["seed"], help="seed (default: %(default)s)")
    add("--device", default=d["device"], help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)")


def add_input_arguments(group: argparse._ActionsContainer, *, skip: tuple[str, ...] = ()) -> None:
    """Add ``--cache``, ``--cache-budget`` and ``--stream``: how a command reads its dataset
    (:func:`ambient_fast.data.stream.choose_backend`; ``train``, ``loop``, ``annotate``)."""
    from ..data.stream import CACHE_BUDGET_BYTES

    if "cache" not in skip:
        group.add_argument(
            "--cache",
            choices=("auto", "on", "off"),
            default="auto",
            help="hold the decoded dataset in memory (EDM's mode); auto = when it fits --cache-budget, else stream "
            "(default: %(default)s)",
        )
    if "cache_budget_bytes" not in skip:
        group.add_argument(
            "--cache-budget",
            dest="cache_budget_bytes",
            type=byte_size,
            default=CACHE_BUDGET_BYTES,
            metavar="BYTES",
            help="largest decoded dataset --cache auto keeps in memory, e.g. 512M, 4G (default: 4G)",
        )
    if "stream" not in skip:
        group.add_argument(
            "--stream",
            choices=("auto", "dali", "torch"),
            default="auto",
            help="reader when not cached: DALI (GPU decode on CUDA) or the torch DataLoader; auto = DALI if "
            "installed (default: %(default)s)",
        )


def check_input_args(parser: argparse.ArgumentParser, dataset: Any, options: dict[str, Any]) -> str:
    """The backend that ``options``' ``cache`` / ``cache_budget_bytes`` / ``stream`` (e.g.
    ``vars(args)``) choose for ``dataset``: ``"cache"``, ``"dali"`` or ``"torch"``; else
    ``parser.error`` naming the option (``--stream dali`` without DALI, or on a tensor dataset)."""
    from ..data.stream import choose_backend

    try:
        return choose_backend(dataset, options["cache"], options["cache_budget_bytes"], options["stream"])
    except (ValueError, ImportError) as err:
        parser.error(f"argument --stream: {err}")


def check_training_data(parser: argparse.ArgumentParser, flag: str, data: Path, options: dict[str, Any]) -> Any:
    """The dataset ``data`` (given as ``flag``) opens, its annotation reads, ``options``'
    network (:func:`ambient_fast.loops.train` keywords; missing ones take its defaults) fits
    its samples, and the input options name a reader that exists; returns the dataset."""
    options = {**train_defaults(), **options}
    dataset = open_dataset_arg(parser, flag, data)
    if options["use_labels"] and dataset.labels is None:
        parser.error(f"argument --use-labels: {data} has no class labels (dataset.json 'labels')")
    check_network(parser, options["network"], options["network_kwargs"], tuple(dataset.sample_shape))
    check_input_args(parser, dataset, options)
    return dataset


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


def output_state(path: Path) -> str:
    """``"new"`` (missing or empty), ``"unfinished"`` (a dataset version whose writing was
    interrupted: a rerun with the same arguments continues it) or ``"taken"``."""
    from ..data.dataset import MANIFEST_NAME
    from ..data.writer import STAGING

    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return "new"
    if path.is_dir() and (path / STAGING).is_dir() and not (path / MANIFEST_NAME).exists():
        return "unfinished"
    return "taken"
