# ruff: noqa: E501  (the miniatures quote the anchors' long lines verbatim, as the guide's edits match them)
"""``docs/switching_from_edm.md`` applied, block by block, to miniatures of the anchors' files.

The miniatures below are written here from ANCHORS.md and the structure of the anchors'
``pixel-diffusion/train.py``, ``training/training_loop.py``, ``restore.py`` and EDM's
``generate.py`` (no upstream code is copied): the same variables and control flow where the
guide edits them, and the lines that the guide's ``before`` blocks quote. The modules those
files import (``dnnlib``, ``torch_utils``, ``ambient_utils``, ``training.loss``,
``generate``) are small stand-ins installed in ``sys.modules`` for the test.

Checked: every ``python`` block of the guide is an edit that applies exactly once to its
file; the edited training loop (option A and option B, each with section 2) trains a tiny
network for a few steps on CPU with finite losses, logs real tensors and buckets the real
sigmas (not the network-summary dummy); the edited sampler and restorer scripts give the
same bits as the original ones, and the restorer writes the same annotations.
"""

from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ambient_fast import EDMPrecond

from .test_compat import ref_edm_restorer, ref_edm_sampler

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "switching_from_edm.md"
IMAGE_SHAPE = (3, 4, 4)


# ----------------------------------------------------------------------------------------
# The guide's edits.


def guide_edits(text: str) -> list[dict]:
    """Every ``python`` block: ``{"file", "option", "before": [lines], "after": [lines]}``."""
    edits = []
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        lines = block.rstrip("\n").split("\n")
        header = re.fullmatch(r"# file: (\S+)(?: \(option (\w)\))?", lines[0])
        assert header, f"guide block is not an edit (first line {lines[0]!r})"
        assert lines[1] == "# before" and "# after" in lines, f"guide block for {lines[0]}: needs # before / # after"
        split = lines.index("# after")
        edits.append({"file": header[1], "option": header[2], "before": lines[2:split], "after": lines[split + 1 :]})
    return edits


def apply_edit(source: str, before: list[str], after: list[str]) -> str:
    """Replace the one occurrence of the ``before`` lines (a ``...`` line spans a region)."""
    lines = source.split("\n")

    def find(needle: list[str], start: int = 0) -> list[int]:
        return [i for i in range(start, len(lines) - len(needle) + 1) if lines[i : i + len(needle)] == needle]

    if "..." in [line.strip() for line in before]:
        cut = [line.strip() for line in before].index("...")
        head, tail = before[:cut], before[cut + 1 :]
        starts = find(head)
        assert len(starts) == 1, f"region start {head[0]!r} found {len(starts)} times"
        ends = find(tail, starts[0] + len(head))
        assert ends, f"region end {tail[-1]!r} not found after its start"
        first, last = starts[0], ends[0] + len(tail)
    else:
        starts = find(before)
        assert len(starts) == 1, f"{before[0]!r} found {len(starts)} times"
        first, last = starts[0], starts[0] + len(before)
    return "\n".join(lines[:first] + after + lines[last:])


def edited(name: str, source: str, option: str | None) -> str:
    """``source`` with the guide's blocks for ``name`` (untagged ones and ``option``'s) applied."""
    for edit in guide_edits(GUIDE.read_text()):
        if edit["file"] == name and edit["option"] in (None, option):
            source = apply_edit(source, edit["before"], edit["after"])
    return source


def test_every_block_is_an_edit_of_a_known_file():
    edits = guide_edits(GUIDE.read_text())
    assert len(edits) >= 11
    assert {e["file"] for e in edits} == {"train.py", "training/training_loop.py", "generate.py", "restore.py"}
    assert {e["option"] for e in edits} == {None, "A", "B"}
    for name, source in MINIATURES.items():
        for edit in guide_edits(GUIDE.read_text()):
            if edit["file"] == name:
                apply_edit(source, edit["before"], edit["after"])  # each block applies exactly once


# ----------------------------------------------------------------------------------------
# Stand-ins for the modules the anchors' files import.


class EasyDict(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def construct_class_by_name(class_name, **kwargs):
    module, _, name = class_name.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)(**kwargs)


class TinyMLP(torch.nn.Module):
    """``F(x_in, c_noise, labels)``: a two-layer MLP on the flattened image and the level."""

    def __init__(self, size):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(size + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, size))

    def forward(self, x, c_noise, labels=None):
        flat = torch.cat([x.reshape(x.shape[0], -1), c_noise.reshape(-1, 1).to(x.dtype)], dim=1)
        return self.layers(flat).reshape(x.shape)


class TinyPrecondNet(torch.nn.Module):
    """EDMPrecond-like denoiser ``net(x, sigma, labels, augment_labels=None)`` (the anchors' interface)."""

    def __init__(self, img_resolution, img_channels, label_dim, **kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        torch.manual_seed(0)
        self.precond = EDMPrecond(TinyMLP(img_channels * img_resolution * img_resolution))

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return self.precond(x, sigma, class_labels)


class AnchorLoss:
    """The anchors' ``AmbientEDMLoss`` (ANCHORS 1.1): per element, four returns."""

    def __init__(self, **kwargs):
        pass

    def __call__(self, net, x_tn, sigma_tn, sigma_t, labels=None, augment_labels=None, **kwargs):
        sigma_tn, sigma_t = sigma_tn[:, None, None, None], sigma_t[:, None, None, None]
        x_t = x_tn + torch.randn_like(x_tn) * torch.sqrt(sigma_t**2 - sigma_tn**2)
        x0_pred = net(x_t, sigma_t, labels, augment_labels=augment_labels)
        ratio = (sigma_tn / sigma_t) ** 2
        weight = (0.25 + sigma_t**2) / (sigma_t**2 * 0.25) * sigma_t**4 / (sigma_t**2 - sigma_tn**2) ** 2
        return weight * ((1 - ratio) * x0_pred + ratio * x_t - x_tn) ** 2, x0_pred, sigma_t, x_t


class AnchorSampler(torch.utils.data.Sampler):
    """The anchors' sigma-first scan with its ``sampled_sigmas`` dict (ANCHORS 1.2), global RNG."""

    def __init__(self, dataset, rank=0, num_replicas=1, seed=0, window_size=0.5, s_max=None):
        self.dataset, self.seed, self.window_size = dataset, seed, window_size
        self.sampled_sigmas = {}
        self.buffer = 1.0 if s_max is None else math.sqrt(1 + 1 / (s_max - 1))

    def __iter__(self):
        order = np.arange(len(self.dataset))
        swaps = np.random.RandomState(self.seed)
        swaps.shuffle(order)
        window = int(np.rint(order.size * self.window_size))
        sigma, step = math.exp(np.random.normal() * 1.2 - 1.2), 0
        while True:
            i = step % order.size
            name = self.dataset._image_fnames[order[i]]
            low, high = self.dataset.annotations.get(name, (0.0, 300.0))
            if sigma > low * self.buffer or sigma < high:
                self.sampled_sigmas[name] = sigma
                yield order[i]
                sigma = math.exp(np.random.normal() * 1.2 - 1.2)
            if window >= 2:
                j = (i - swaps.randint(window)) % order.size
                order[i], order[j] = order[j], order[i]
            step += 1


class AnchorDataset(torch.utils.data.Dataset):
    """``SyntheticallyCorruptedImageFolderDataset``-like items: image, label, frozen noise, filename."""

    def __init__(self, path, resolution=IMAGE_SHAPE[1], **kwargs):
        self.path = path
        self._image_fnames = [f"00000/img{i:08d}.png" for i in range(24)]
        self.resolution, self.num_channels, self.label_dim = resolution, IMAGE_SHAPE[0], 0

    def __len__(self):
        return len(self._image_fnames)

    def __getitem__(self, idx):
        rng = np.random.RandomState(idx)
        image = np.clip(rng.standard_normal(IMAGE_SHAPE) * 0.5, -1, 1).astype(np.float32)
        return {
            "image": image,
            "label": np.zeros(0, np.float32),
            "noise": np.random.RandomState(idx).randn(*IMAGE_SHAPE),
            "filename": self._image_fnames[idx],
        }


class Recorder:
    def __init__(self):
        self.images, self.buckets, self.losses = {}, [], []

    def save_images(self, tensor, path, **kwargs):
        self.images[Path(path).name.rsplit("_", 1)[0]] = tensor.detach().clone()

    def bucketize(self, sigma, buckets):
        self.buckets.append(sigma.detach().clone())
        return torch.arange(sigma.numel()) % buckets

    def report(self, name, value):
        if name == "Loss/loss":
            self.losses.append(float(value.detach().sum()))
        return value


@pytest.fixture
def anchor_modules(monkeypatch):
    """Install the stand-in modules; returns the recorder of logs."""
    recorder = Recorder()

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    dnnlib = module("dnnlib", EasyDict=EasyDict)
    dnnlib.util = module("dnnlib.util", construct_class_by_name=construct_class_by_name)
    dist = module("torch_utils.distributed", get_rank=lambda: 0, get_world_size=lambda: 1, print0=lambda *a: None)
    stats = module("torch_utils.training_stats", report=recorder.report, report0=lambda name, value: value)
    misc = module("torch_utils.misc", InfiniteSampler=AnchorSampler)
    module("torch_utils", distributed=dist, training_stats=stats, misc=misc)
    ambient_utils = module("ambient_utils", save_images=recorder.save_images)
    ambient_utils.utils = module("ambient_utils.utils", bucketize=recorder.bucketize)
    ambient_utils.dataset = module("ambient_utils.dataset", SyntheticallyCorruptedImageFolderDataset=AnchorDataset)
    training = module("training")
    training.loss = module("training.loss", AmbientEDMLoss=AnchorLoss)
    training.networks = module("training.networks", EDMPrecond=TinyPrecondNet)
    training.training_loop = module("training.training_loop")
    return recorder


# ----------------------------------------------------------------------------------------
# Miniatures of the anchors' files (the lines the guide edits are theirs; the rest is ours).

TRAIN_PY = """
import dnnlib
from training import training_loop

def main(data, s_max=4.0, workers=0):
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(path=data)
    if data.endswith('/npy'):
        c.dataset_kwargs['normalize'] = False
        c.add_noise = False
    c.data_loader_kwargs = dnnlib.EasyDict(num_workers=workers)
    c.network_kwargs = dnnlib.EasyDict()
    c.loss_kwargs = dnnlib.EasyDict()
    c.sampler_kwargs = dnnlib.EasyDict()
    if True:
        c.network_kwargs.class_name = 'training.networks.EDMPrecond'
        c.loss_kwargs.class_name = 'training.loss.AmbientEDMLoss'
        c.sampler_kwargs.s_max = s_max
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=1e-3, betas=[0.9, 0.999], eps=1e-8)
    return c
"""

TRAINING_LOOP_PY = """
import os
import json
from collections import defaultdict
import numpy as np
import torch
import dnnlib
from torch_utils import distributed as dist
from torch_utils import training_stats
from torch_utils import misc
import ambient_utils

def training_loop(run_dir='.', dataset_kwargs={}, data_loader_kwargs={}, network_kwargs={}, loss_kwargs={},
                  optimizer_kwargs={}, augment_kwargs=None, seed=0, batch_size=8, batch_gpu=None, total_kimg=0.04,
                  lr_rampup_kimg=0, loss_scaling=1, device=torch.device('cpu'), clip=1.0, cls_epsilon=0.05,
                  cls_ema_window=32, crop_size=None, sampler_kwargs={}, add_noise=True):
    np.random.seed(seed)
    torch.manual_seed(np.random.randint(1 << 31))
    batch_gpu_total = batch_size // dist.get_world_size()
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    num_accumulation_rounds = batch_gpu_total // batch_gpu
    dataset_obj = ambient_utils.dataset.SyntheticallyCorruptedImageFolderDataset(**dataset_kwargs)

    # check if there is a file annotations.jsonl in the dataset_kwargs.path
    annotations_file = os.path.join(dataset_kwargs["path"], "annotations.jsonl")
    annotations = defaultdict(lambda: (0., 0.))
    lines_read = 0
    if os.path.exists(annotations_file):
        with open(annotations_file, "r") as f:
            for line in f:
                lines_read += 1
                record = json.loads(line)
                annotations[record["filename"]] = (record["sigma_min"], record["sigma_max"])
    if dist.get_rank() == 0:
        print(f"Num annotations: {len(list(annotations.keys()))}, Lines read: {lines_read}")
        print(f"Average max annotation excluding 0: {np.mean([x[1] for x in annotations.values() if x[1] != 0])}")
    dataset_obj.annotations = dict(annotations)
    dataset_sampler = misc.InfiniteSampler(
        dataset=dataset_obj,
        rank=dist.get_rank(),
        num_replicas=dist.get_world_size(),
        seed=seed,
        **sampler_kwargs,
    )
    dataloader = torch.utils.data.DataLoader(dataset=dataset_obj, sampler=dataset_sampler, batch_size=batch_gpu, **data_loader_kwargs)
    dataset_iterator = iter(dataloader)

    interface_kwargs = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels, label_dim=dataset_obj.label_dim)
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)
    net.train().requires_grad_(True).to(device)
    with torch.no_grad():
        images = torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device)
        sigma = torch.ones([batch_gpu], device=device)
        labels = torch.zeros([batch_gpu, net.label_dim], device=device)
        net(images, sigma, labels)

    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    augment_pipe = None
    ddp = net
    cur_nimg = 0
    cur_tick = 0
    net_dtype = next(ddp.parameters()).dtype
    while True:
        optimizer.zero_grad(set_to_none=True)
        for round_idx in range(num_accumulation_rounds):
            if True:
                dataset_item = next(dataset_iterator)
                images = dataset_item["image"].to(device=device, dtype=net_dtype)
                labels = dataset_item["label"].to(device=device, dtype=net_dtype)
                cls_labels = dataset_item.get("corruption_label", torch.zeros_like(labels)).to(device)
                batch_annotations = [annotations[x] for x in dataset_item['filename']]

                sigma_min = torch.tensor([x[0] for x in batch_annotations], device=device)
                sigma_max = torch.tensor([x[1] for x in batch_annotations], device=device)
                sigma_t = torch.tensor([dataset_sampler.sampled_sigmas[x] for x in dataset_item['filename']], device=device)

                # ambient-crops: this means that the image is used in the (0, t_min) range
                sigma_tn = torch.where(sigma_t < sigma_max, torch.zeros_like(sigma_min), sigma_min)

                x0, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
                x_tn = x0 + dataset_item["noise"].to(device).to(images.dtype) * sigma_tn[:, None, None, None] * float(add_noise == True)

                if crop_size is not None:
                    x_tn[:, :, :crop_size, :] = 0

                loss, x0_pred, sigma, noisy_input = loss_fn(net=ddp, x0=x0, x_tn=x_tn, sigma_tn=sigma_tn, sigma_t=sigma_t, labels=labels, augment_labels=augment_labels, cls_labels=cls_labels)
                bucket_indices = ambient_utils.utils.bucketize(sigma.squeeze(), 4)

                if cur_tick % 100 == 0 and dist.get_rank() == 0:
                    ambient_utils.save_images(images, os.path.join(run_dir, f"batch_images_{cur_tick}.png"))
                    ambient_utils.save_images(x_tn, os.path.join(run_dir, f"current_sigma_images_{cur_tick}.png"))
                    ambient_utils.save_images(noisy_input, os.path.join(run_dir, f"inputs_{cur_tick}.png"))
                    ambient_utils.save_images(x0_pred, os.path.join(run_dir, f"outputs_{cur_tick}.png"))

                training_stats.report('Loss/loss', loss)
                for bucket_idx in range(4):
                    training_stats.report(f'Loss/bucket_{bucket_idx}', loss[bucket_indices == bucket_idx])
                loss.sum().mul(loss_scaling / batch_gpu_total).backward()

        torch.nn.utils.clip_grad_norm_(ddp.parameters(), clip)
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        cur_nimg += batch_size
        done = cur_nimg >= total_kimg * 1000
        if dist.get_rank() == 0:
            print(f"tick {training_stats.report0('Progress/tick', cur_tick):<5d} kimg {cur_nimg / 1e3:<9.3f}")
        cur_tick += 1
        if done:
            break
    return net
"""

GENERATE_PY = """
import torch
import dnnlib

def ablation_sampler(*args, **kwargs):
    raise AssertionError("not used here")

def main(net, seeds, max_batch_size, **sampler_kwargs):
    outputs = {}
    for batch_seeds in torch.as_tensor(seeds).tensor_split(max(1, len(seeds) // max_batch_size)):
        rnd = StackedRandomGenerator('cpu', batch_seeds)
        latents = rnd.randn([len(batch_seeds), net.img_channels, net.img_resolution, net.img_resolution])
        class_labels = None
        sampler_kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
        have_ablation_kwargs = any(x in sampler_kwargs for x in ['solver', 'discretization', 'schedule', 'scaling'])
        sampler_fn = ablation_sampler if have_ablation_kwargs else edm_sampler
        images = sampler_fn(net, latents, class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
        outputs.update({int(seed): image for seed, image in zip(batch_seeds, images)})
    return outputs
"""

RESTORE_PY = """
import os
import json
import torch
import dnnlib
from generate import StackedRandomGenerator, load_hf_checkpoint, parse_int_list

def main(net, dataset, prev_annotations, outdir, max_batch_size, rho_ambient, **sampler_kwargs):
    restored = {}
    for start in range(0, len(dataset), max_batch_size):
        items = [dataset[i] for i in range(start, min(start + max_batch_size, len(dataset)))]
        images = torch.stack([torch.from_numpy(item["image"]) for item in items])
        class_labels = None
        image_names = [item["filename"].split("/")[-1] for item in items]
        rnd = StackedRandomGenerator('cpu', list(range(start, start + len(items))))
        latents = rnd.randn([images.size(0), net.img_channels, net.img_resolution, net.img_resolution])
        sigma_tn = torch.Tensor([prev_annotations[image_name][0] for image_name in image_names])
        sampler_kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
        sampler_kwargs['add_noise'] = True
        sampler_fn = edm_restorer
        sigma_start = sigma_tn
        sigma_end = sigma_start / rho_ambient if rho_ambient is not None else torch.zeros_like(sigma_start)
        with torch.no_grad():
            restored_images = sampler_fn(images, sigma_start, torch.zeros_like(sigma_end), net, latents, class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
            restored_images = restored_images.to(dtype=images.dtype)
        restored.update(zip(image_names, restored_images))
        with open(os.path.join(outdir, "annotations_0.jsonl"), "a", encoding="utf-8") as f:
            for i, image_name in enumerate(image_names):
                annotation = {
                    "filename": image_name,
                    "sigma_min": sigma_end[i].item(),
                    "sigma_max": 0.0,
                }
                f.write(json.dumps(annotation) + "\\n")
    return restored
"""

MINIATURES = {
    "train.py": TRAIN_PY,
    "training/training_loop.py": TRAINING_LOOP_PY,
    "generate.py": GENERATE_PY,
    "restore.py": RESTORE_PY,
}


def run_source(source: str, name: str, extra: dict | None = None) -> dict:
    namespace = {"__name__": f"miniature_{name}"}
    namespace.update(extra or {})
    exec(compile(source, name, "exec"), namespace)  # noqa: S102 (the guide's edits of our miniatures)
    return namespace


# ----------------------------------------------------------------------------------------
# The edited miniatures run.


def _annotated_folder(tmp_path) -> Path:
    root = tmp_path / "cifar-blur"
    root.mkdir()
    names = [f"00000/img{i:08d}.png" for i in range(24)]
    lines = [{"filename": n, "sigma_min": 1.2 if i % 3 else 0.0, "sigma_max": 0.0} for i, n in enumerate(names)]
    lines[4]["sigma_max"] = 0.5
    (root / "annotations.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@pytest.mark.parametrize("option", ["A", "B"])
def test_edited_training_loop_trains(anchor_modules, tmp_path, option):
    root = _annotated_folder(tmp_path)
    config = run_source(edited("train.py", TRAIN_PY, option), "train.py")["main"](str(root))
    loop = run_source(edited("training/training_loop.py", TRAINING_LOOP_PY, option), "training_loop.py")
    assert "sampled_sigmas" not in edited("training/training_loop.py", TRAINING_LOOP_PY, option)
    net = loop["training_loop"](run_dir=str(tmp_path), batch_size=8, total_kimg=0.04, **config)
    assert len(anchor_modules.losses) == 5 and all(math.isfinite(v) for v in anchor_modules.losses)
    # The logs got real tensors: the noisy input, the prediction and x_tn of the batch.
    logged = anchor_modules.images
    assert set(logged) == {"batch_images", "current_sigma_images", "inputs", "outputs"}
    assert all(t.shape == (8, *IMAGE_SHAPE) and torch.isfinite(t).all() for t in logged.values())
    assert not torch.equal(logged["inputs"], logged["current_sigma_images"])
    # The buckets saw the batch's drawn sigmas, not the summary block's dummy ones.
    for sigma in anchor_modules.buckets:
        assert sigma.shape == (8,) and not torch.equal(sigma, torch.ones(8)) and len(set(sigma.tolist())) > 1
    assert all(p.grad is not None for p in net.parameters())


def test_unedited_training_loop_runs_as_the_reference(anchor_modules, tmp_path):
    """The miniature itself (the anchors' way: dict of sigmas, their loss) trains as well."""
    root = _annotated_folder(tmp_path)
    config = run_source(TRAIN_PY, "train.py")["main"](str(root))
    run_source(TRAINING_LOOP_PY, "training_loop.py")["training_loop"](run_dir=str(tmp_path), **config)
    assert len(anchor_modules.losses) == 5 and all(math.isfinite(v) for v in anchor_modules.losses)


class PerRowGenerator:
    """EDM's StackedRandomGenerator behaviour, written here (one torch.Generator per seed)."""

    def __init__(self, device, seeds):
        self.gens = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, size, **kwargs):
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.gens])

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)


def _anchor_edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, **kwargs):
    return ref_edm_sampler(net, latents, randn_like, **kwargs)


def test_edited_generate_gives_edms_bits(anchor_modules):
    net = TinyPrecondNet(IMAGE_SHAPE[1], IMAGE_SHAPE[0], 0).double()
    extra = {"StackedRandomGenerator": PerRowGenerator, "edm_sampler": _anchor_edm_sampler}
    kwargs = dict(seeds=list(range(6)), max_batch_size=3, num_steps=7, S_churn=30, S_min=0.01, S_max=10)
    before = run_source(GENERATE_PY, "generate.py", extra)["main"](net, **kwargs)
    after = run_source(edited("generate.py", GENERATE_PY, None), "generate.py", extra)["main"](net, **kwargs)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _anchor_edm_restorer(x, sigma_start, sigma_end, net, latents, class_labels=None, randn_like=None, **kwargs):
    return ref_edm_restorer(x, sigma_start, sigma_end, net, latents, randn_like, **kwargs)


def test_edited_restore_gives_the_same_bits_and_annotations(anchor_modules, monkeypatch, tmp_path):
    generate = types.ModuleType("generate")
    generate.StackedRandomGenerator, generate.load_hf_checkpoint, generate.parse_int_list = PerRowGenerator, None, None
    monkeypatch.setitem(sys.modules, "generate", generate)
    net = TinyPrecondNet(IMAGE_SHAPE[1], IMAGE_SHAPE[0], 0).double()
    dataset = [AnchorDataset("unused")[i] for i in range(7)]
    levels = [1.2, 0.0, 0.002, 0.6, 2.4, 0.0, 0.15]
    prev = {f"img{i:08d}.png": (level, 0.0) for i, level in enumerate(levels)}
    outputs = {}
    for label, source in (("before", RESTORE_PY), ("after", edited("restore.py", RESTORE_PY, None))):
        outdir = tmp_path / label
        outdir.mkdir()
        namespace = run_source(source, "restore.py", {"edm_restorer": _anchor_edm_restorer})
        restored = namespace["main"](net, dataset, prev, str(outdir), 3, 8.0, num_steps=6, S_churn=20, S_max=1.0)
        outputs[label] = (restored, (outdir / "annotations_0.jsonl").read_text())
    (restored_before, notes_before), (restored_after, notes_after) = outputs["before"], outputs["after"]
    assert all(torch.equal(restored_before[k], restored_after[k]) for k in restored_before)
    assert notes_before == notes_after and "0.0002500000118743628" in notes_after
