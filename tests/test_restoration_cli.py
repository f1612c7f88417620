"""``ambient-fast restore`` (option validation, --help, --dry-run, JSON report) and the
denoiser checkpoint format (``save_denoiser`` / ``load_denoiser``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ambient_fast.cli import build_parser, main
from ambient_fast.commands.restore import path_defaults
from ambient_fast.core.precond import EDMPrecond
from ambient_fast.restoration import load_denoiser, read_denoiser_config, save_denoiser
from tests.test_restoration_dataset import make_denoiser, make_png_dataset, tree_bytes

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    src = make_png_dataset(tmp_path / "src", n=12)
    model = save_denoiser(tmp_path / "model.safetensors", make_denoiser(), name="unet-tiny", extra={"step": 7})
    return src, model


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path: Path) -> None:
    denoiser = make_denoiser(seed=3)
    path = save_denoiser(tmp_path / "d.safetensors", denoiser, name="unet-tiny", extra={"ema": 0.999})
    config = read_denoiser_config(path)
    assert (config.network, config.network_kwargs, config.sigma_data, config.extra) == (
        "unet-tiny",
        {},
        0.5,
        {"ema": 0.999},
    )
    loaded = load_denoiser(path)
    assert isinstance(loaded, EDMPrecond) and not loaded.training
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 5.0])
    torch.testing.assert_close(loaded(x, sigma), denoiser(x, sigma), rtol=0, atol=0)


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_denoiser(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="no 'ambient_fast' metadata"):
        load_denoiser(plain)
    bad = tmp_path / "bad.safetensors"
    save_file(
        {"w": torch.zeros(2)},
        str(bad),
        metadata={"ambient_fast": json.dumps({"format_version": 1, "network": "unet-tiny", "sigma_data": -1})},
    )
    with pytest.raises(ValueError, match="sigma_data"):
        load_denoiser(bad)
    wrong = tmp_path / "wrong.safetensors"
    save_file(
        {"w": torch.zeros(2)},
        str(wrong),
        metadata={"ambient_fast": json.dumps({"format_version": 1, "network": "unet-tiny"})},
    )
    with pytest.raises(ValueError, match="do not match"):
        load_denoiser(wrong)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        read_denoiser_config(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------- CLI
def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["restore", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "torchrun" in text and "--sigma-out" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-steps", "0"], "--num-steps"),
        (["--method", "ddim"], "--method"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**32)], "--seed"),
        (["--rho-ambient", "0.5"], "--rho-ambient"),
        (["--sigma-out", "nan"], "--sigma-out"),
        (["--shard-size", "0"], "--shard-size"),
        (["--output-codec", "jpeg"], "--output-codec"),
        (["--output-codec", "webp:101"], "--output-codec"),
        (["--on-bad-sample", "ignore"], "--on-bad-sample"),
        (["--resolution", "0x8"], "--resolution"),
        (["--max-pixels", "0"], "--max-pixels"),
        (["--reader", "opencv"], "--reader"),
        (["--grid", "global", "--sigma-out", "0.1"], "--sigma-out"),
        (["--compile", "reduce-overhead", "--cuda-graph", "on"], "--cuda-graph"),
        (["--precision", "fp8"], "--precision"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_invalid_options_are_refused(
    setup, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    src, model = setup
    with pytest.raises(SystemExit) as exit_info:
        main(["restore", "--model", str(model), "--src", str(src), "--dst", str(tmp_path / "dst"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_missing_model_and_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (
            ["--model", str(tmp_path / "no.safetensors"), "--src", str(tmp_path), "--dst", str(tmp_path / "d")],
            "--model",
        ),
        (["--model", __file__, "--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "d")], "--src"),
        (["--model", __file__, "--src", str(tmp_path), "--dst", str(tmp_path / "d")], "--model"),  # not a checkpoint
    ):
        with pytest.raises(SystemExit):
            main(["restore", *argv])
        assert message in capsys.readouterr().err


def test_dry_run_and_run(setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, model = setup
    base = [
        "restore",
        "--model",
        str(model),
        "--src",
        str(src),
        "--dst",
        str(tmp_path / "dst"),
        "--num-steps",
        "4",
        "--batch-size",
        "4",
        "--workers",
        "2",
        "--no-progress",
    ]
    assert main([*base, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and plan["num_restored"] == 9 and plan["nfe_per_sample"] == 7
    # the batch's memory: 4 pinned slots of 4 samples (raw + output rows 1x8x8 u8 + 5 levels + 3 seeds/levels)
    assert plan["host_batch_bytes"] == 4 * 4 * (64 + 64 + 8 * 5 + 8 * 3) and plan["device_batch_bytes"] > 0
    assert not (tmp_path / "dst").exists()
    assert main([*base, "--report", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_restored"] == 9 and report["images_per_second"] > 0 and report["world_size"] == 1
    assert (tmp_path / "dst" / "manifest.json").is_file()
    before = tree_bytes(tmp_path / "dst")
    assert main([*base, "--seed", "1"]) == 1  # an existing, different version is refused
    assert "already exists" in capsys.readouterr().err
    assert tree_bytes(tmp_path / "dst") == before


def test_command_is_registered() -> None:
    parser = build_parser()
    args = path_defaults(parser.parse_args(["restore", "--model", "m", "--src", "s", "--dst", "d"]))
    assert args.method == "heun" and args.num_steps == 18 and args.rho_ambient == 8.0 and args.grid == "per_sample"
    latent = path_defaults(parser.parse_args(["restore", "--diffusers", "m", "--src", "s", "--dst", "d"]))
    assert (latent.num_steps, latent.rho_ambient, latent.grid) == (30, 2.0, "global")  # ANCHORS 3.3
