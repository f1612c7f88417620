"""Triton kernels against their plain-PyTorch references (SPEC 2 and 4).

On CPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets TRITON_INTERPRET):
about 1 ms per program, so the shapes stay small and tests that need several blocks per row
lower ``max_block`` on the launchers instead of growing the rows. ``gpu`` tests repeat the
checks at benchmark sizes on CUDA.

Tolerances: fp32 and fp64 compare to the reference in the same precision; fp16/bf16 use the
three-way rule ``max|fast - ref64| <= 2 max|ref_lowp - ref64| + atol`` with the reference in
fp64. ``atol`` is one unit in the last place of the output's largest value: Triton's
interpreter rounds fp32 -> bf16 toward zero where the GPU and torch round to nearest.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import ambient_fast
from ambient_fast.core import solver_step as ref_step
from ambient_fast.core.loss import LossConfig, per_sample_loss_reference
from ambient_fast.kernels import ambient_loss as loss_kernels
from ambient_fast.kernels._layout import empty_rows_like
from ambient_fast.kernels.ambient_loss import MAX_BLOCK, fused_ambient_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
RTOL = {torch.float32: 2e-6, torch.float64: 1e-12}
VARIANTS = [("ve", "x0"), ("ve", "eps"), ("vp", "x0"), ("vp", "eps")]


def ambient_loss_triton(*args):
    """The one op's Triton kernel through the eager entry point (contract of the reference)."""
    return fused_ambient_loss(*args, kernel="triton")


def step_module(op: str):
    """``ambient_fast.kernels.<op>_step``: the op's file (kernel, launcher, op, entry point)."""
    return importlib.import_module(f"ambient_fast.kernels.{op}_step")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))


def _assert_matches(fast: torch.Tensor, ref_lowp: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32/fp64: relative match to the same-precision reference; fp16/bf16: three-way rule."""
    assert not torch.isnan(fast).any(), "output has unwritten (NaN) elements"
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    if dtype in LOW_PRECISION:
        err = (fast.double() - ref64).abs().max().item()
        base = (ref_lowp.double() - ref64).abs().max().item()
        bound = 2 * base + torch.finfo(dtype).eps * scale
        assert err <= bound, f"|fast - ref64| = {err:.3g}, |ref_lowp - ref64| = {base:.3g}"
    else:
        torch.testing.assert_close(fast, ref_lowp, rtol=RTOL[dtype], atol=RTOL[dtype] * scale)


def _levels(batch: int, schedule: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sigma, sigma_min, sigma_max cycling through five kinds of rows (SPEC 2's mask cases).

    0: clean (sigma_min = 0); 1: corrupt and eligible; 2: corrupt with sigma < sigma_min;
    3: sigma == sigma_min exactly (the coefficients' pole); 4: locality (sigma < sigma_max,
    sigma_min > sigma), trained as clean.
    """
    hi = 0.9 if schedule == "vp" else 5.0
    sigma = torch.empty(batch, dtype=torch.float64).uniform_(0.05, hi)
    kind = torch.arange(batch) % 5
    above = sigma * torch.empty(batch, dtype=torch.float64).uniform_(0.1, 0.8)
    below = torch.clamp(sigma * 1.5, max=0.99) if schedule == "vp" else sigma * 1.5
    sigma_min = torch.where(kind == 0, 0.0, torch.where(kind == 1, above, torch.where(kind == 3, sigma, below)))
    sigma_max = torch.where(kind == 4, sigma * 2, 0.0)
    level_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return tuple(t.to(level_dtype).to(DEVICE) for t in (sigma, sigma_min, sigma_max))  # type: ignore[return-value]


def _loss_inputs(shape: tuple[int, ...], dtype: torch.dtype, schedule: str):
    pred, y_t, y_tmin = (torch.randn(shape, dtype=torch.float64, device=DEVICE).to(dtype) for _ in range(3))
    return (pred, y_t, y_tmin, *_levels(shape[0], schedule, dtype))


def _reference_with_grad(pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg, to=None):
    """Reference loss and d sum(loss) / d pred, optionally with every tensor cast to ``to``."""
    cast = (lambda t: t) if to is None else (lambda t: None if t is None else t.to(to))
    leaf = cast(pred).detach().requires_grad_(True)
    loss = per_sample_loss_reference(
        leaf, cast(y_t), cast(y_tmin), cast(sigma), cast(sigma_min), cast(sigma_max), cast(weight), cfg
    )
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


def _run_loss_fwd(pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg, max_block=MAX_BLOCK):
    """The launcher into NaN-poisoned outputs, so unwritten elements show."""
    loss = _poisoned(torch.empty(pred.shape[0], dtype=_compute_dtype(pred.dtype), device=pred.device))
    grad = _poisoned(empty_rows_like(pred))
    loss_kernels.ambient_loss_fwd(
        loss, grad, pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg, max_block=max_block
    )
    return loss, grad


def _check_loss(inputs, weight, cfg, dtype, max_block=MAX_BLOCK):
    loss, grad = _run_loss_fwd(*inputs, weight, cfg, max_block=max_block)
    ref_loss, ref_grad = _reference_with_grad(*inputs, weight, cfg)
    ref64_loss, ref64_grad = _reference_with_grad(*inputs, weight, cfg, to=torch.float64)
    _assert_matches(loss, ref_loss, ref64_loss, dtype)
    _assert_matches(grad, ref_grad, ref64_grad, dtype)
    # Rows that do not train are exactly zero, loss and gradient alike.
    idle = ref64_loss == 0
    assert torch.equal(loss[idle], torch.zeros_like(loss[idle]))
    assert torch.equal(grad[idle], torch.zeros_like(grad[idle]))
    return loss, grad


# ----------------------------------------------------------------------------------------------
# Fused ambient loss
# ----------------------------------------------------------------------------------------------


# (shape, max_block): a single element, 1000-element rows packed several per program, rows
# split into four blocks (two-stage reduction), rows of more blocks than one reduction block
# (the second stage loops), and rows longer than the default block.
LOSS_CASES = [
    ((1, 1), MAX_BLOCK),
    ((5, 1000), MAX_BLOCK),
    ((7, 3, 5, 7), 32),
    ((2, 37), 4),
    ((3, 5000), MAX_BLOCK),
]


@pytest.mark.parametrize("schedule,target", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,max_block", LOSS_CASES, ids=str)
def test_loss_matches_reference(shape, max_block, dtype, schedule, target):
    inputs = _loss_inputs(shape, dtype, schedule)
    _check_loss(inputs, None, LossConfig(schedule, target), dtype, max_block)


@pytest.mark.parametrize("weight", ["edm", "none", "tensor"])
@pytest.mark.parametrize("contraction", [False, True])
@pytest.mark.parametrize("rule", ["s_max", "buffer"])
@pytest.mark.parametrize("schedule", ["ve", "vp"])
def test_loss_options(weight, contraction, rule, schedule):
    inputs = _loss_inputs((10, 2, 3, 5), torch.float32, schedule)
    scale, shift = (1.0, 0.05) if rule == "buffer" else (math.sqrt(4.0 / 3.0), 0.0)
    cfg = LossConfig(schedule, "x0", contraction, scale, shift, weight == "edm", 0.5)
    weights = torch.rand(10, device=DEVICE) + 0.5 if weight == "tensor" else None
    _check_loss(inputs, weights, cfg, torch.float32, max_block=16)


def test_loss_non_contiguous_inputs():
    """channels_last pred, y_t in another layout, strided y_tmin, a batch slice, strided levels."""
    dtype = torch.float32
    pred = torch.randn(6, 3, 4, 5, device=DEVICE).to(memory_format=torch.channels_last)
    y_t = torch.randn(12, 3, 4, 5, device=DEVICE)[::2]  # row stride 2N, contiguous rows
    y_tmin = torch.randn(6, 3, 4, 10, device=DEVICE)[..., ::2]  # not dense: copied
    table = torch.stack(_levels(6, "ve", dtype), dim=1)  # (B, 3): every level has stride 3
    sigma, sigma_min = table[:, 0], table[:, 1]
    sigma_max = torch.zeros((), device=DEVICE).expand(6)  # stride 0
    inputs = (pred, y_t, y_tmin, sigma, sigma_min, sigma_max)
    _, grad = _check_loss(inputs, None, LossConfig(), dtype, max_block=32)
    assert grad.stride() == pred.stride()


def test_loss_bitwise_reproducible():
    inputs = _loss_inputs((4, 3, 7, 9), torch.float32, "ve")
    first = _run_loss_fwd(*inputs, None, LossConfig(), max_block=64)
    second = _run_loss_fwd(*inputs, None, LossConfig(), max_block=64)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_autograd_through_op(dtype):
    """Forward writes d loss / d pred; backward scales it by the upstream (stride-0) gradient."""
    pred, y_t, y_tmin, sigma, sigma_min, sigma_max = _loss_inputs((10, 3, 5, 5), dtype, "ve")
    weight = torch.rand(10, device=DEVICE) + 0.5
    cfg = LossConfig()
    leaf = pred.detach().requires_grad_(True)
    loss = ambient_loss_triton(leaf, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg)
    loss.mean().backward()
    ref_leaf = pred.detach().requires_grad_(True)
    ref = per_sample_loss_reference(ref_leaf, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg)
    ref.mean().backward()
    leaf64 = pred.detach().double().requires_grad_(True)
    rest64 = (t.double() for t in (y_t, y_tmin, sigma, sigma_min, sigma_max, weight))
    ref64 = per_sample_loss_reference(leaf64, *rest64, cfg)
    ref64.mean().backward()
    _assert_matches(loss.detach(), ref.detach(), ref64.detach(), dtype)
    _assert_matches(leaf.grad, ref_leaf.grad, leaf64.grad, dtype)
    assert leaf.grad.dtype == dtype


def test_loss_without_grad_writes_no_gradient():
    pred, *rest = _loss_inputs((5, 8), torch.float32, "ve")
    with torch.no_grad():
        loss = ambient_loss_triton(pred.requires_grad_(True), *rest, None, LossConfig())
    assert not loss.requires_grad
    args = (pred.detach(), *rest, None, "ve", "x0", False, 1.1547, 0.0, True, 0.5, False, "triton")
    assert torch.ops.ambient_fast.ambient_loss(*args)[1].numel() == 0


def test_loss_refuses_gradients_it_does_not_compute():
    pred, y_t, *rest = _loss_inputs((5, 8), torch.float32, "ve")
    with pytest.raises(ValueError, match="y_t requires grad"):
        ambient_loss_triton(pred, y_t.requires_grad_(True), *rest, None, LossConfig())


def test_loss_rejects_samples_without_elements():
    pred, y_t, y_tmin = (torch.empty(3, 0, device=DEVICE) for _ in range(3))
    with pytest.raises(ValueError, match="no elements"):
        ambient_loss_triton(pred, y_t, y_tmin, *_levels(3, "ve", torch.float32), None, LossConfig())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_loss_backward_kernel(dtype):
    grad_unit = torch.randn(6, 3, 4, 5, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    grad_loss = torch.randn(6, 2, device=DEVICE, dtype=_compute_dtype(dtype))[:, 0]  # stride 2
    out = _poisoned(empty_rows_like(grad_unit))
    loss_kernels.ambient_loss_bwd(out, grad_unit, grad_loss, max_block=16)
    view = (-1, 1, 1, 1)
    ref = (grad_unit.to(grad_loss.dtype) * grad_loss.view(view)).to(dtype)
    ref64 = grad_unit.double() * grad_loss.double().view(view)
    _assert_matches(out, ref, ref64, dtype)
    assert out.stride() == grad_unit.stride()


# ----------------------------------------------------------------------------------------------
# Fused solver steps
# ----------------------------------------------------------------------------------------------

STEPS = ["euler", "heun", "churn", "ancestral"]
STEP_CASES = [((1, 1), MAX_BLOCK), ((5, 1000), MAX_BLOCK), ((6, 3, 5, 7), 32)]


def _step_inputs(op: str, shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool = False):
    """Arguments of ``op`` with per-sample levels read from a float64 (B, K+1) grid table."""
    batch = shape[0]
    x, denoised, second = (torch.randn(shape, dtype=torch.float64, device=DEVICE).to(dtype) for _ in range(3))
    x = x * 10
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    table = torch.sort(torch.rand(batch, 4, dtype=torch.float64, device=DEVICE) * 10 + 0.01, descending=True).values
    sigma, sigma_next = table[:, 1], table[:, 2]
    if op == "churn":
        return (x, second, sigma_next, sigma, 1.007)
    if op == "euler":
        return (x, denoised, sigma, sigma_next)
    sigma_next = torch.where(torch.arange(batch, device=DEVICE) % 3 == 2, 0.0, sigma_next)
    if op == "heun":
        # D(x_euler, 0) is never read: poison it where sigma_next == 0.
        second[sigma_next == 0] = float("nan")
        return (x, denoised, second, sigma, sigma_next)
    return (x, denoised, second, sigma, sigma_next)


def _cast_step_args(args, dtype):
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.dim() > 1 else a for a in args)


def _run_step(op: str, args, max_block: int = MAX_BLOCK) -> torch.Tensor:
    out = _poisoned(empty_rows_like(args[0]))
    getattr(step_module(op), f"{op}_step_fwd")(out, *args, max_block=max_block)
    return out


@pytest.mark.parametrize("op", STEPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,max_block", STEP_CASES, ids=str)
def test_step_matches_reference(op, dtype, shape, max_block):
    args = _step_inputs(op, shape, dtype)
    reference = getattr(ref_step, f"{op}_step")
    out = _run_step(op, args, max_block)
    _assert_matches(out, reference(*args), reference(*_cast_step_args(args, torch.float64)), dtype)
    assert out.dtype == dtype
    assert torch.equal(out, _run_step(op, args, max_block)), "not bitwise reproducible"


@pytest.mark.parametrize("op", STEPS)
def test_step_public_op_non_contiguous(op):
    """channels_last state with contiguous denoiser outputs; the output keeps x's layout."""
    args = _step_inputs(op, (5, 3, 4, 6), torch.float32, channels_last=True)
    out = getattr(step_module(op), f"{op}_step")(*args, kernel="triton")
    reference = getattr(ref_step, f"{op}_step")
    _assert_matches(out, reference(*args), reference(*_cast_step_args(args, torch.float64)), torch.float32)
    assert out.stride() == args[0].stride()


# ----------------------------------------------------------------------------------------------
# torch.library registration, torch.compile, end to end
# ----------------------------------------------------------------------------------------------


def _opcheck_cases():
    pred, y_t, y_tmin, sigma, sigma_min, sigma_max = _loss_inputs((5, 2, 3, 3), torch.float32, "ve")
    pred.requires_grad_(True)
    options = ("ve", "x0", False, math.sqrt(4.0 / 3.0), 0.0, True, 0.5)
    weight = torch.rand(5, device=DEVICE)
    yield "ambient_loss", (pred, y_t, y_tmin, sigma, sigma_min, sigma_max, None, *options, True, "triton")
    yield "ambient_loss", (pred.detach(), y_t, y_tmin, sigma, sigma_min, sigma_max, weight, *options, False, "triton")
    for op in STEPS:
        yield f"{op}_step", (*_step_inputs(op, (3, 2, 3, 3), torch.float32), "triton")


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    name, args = list(_opcheck_cases())[case]
    torch.library.opcheck(getattr(torch.ops.ambient_fast, name).default, args)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compile_training_step_fullgraph(device):
    """A training step using the loss compiles with no graph break and matches eager.

    On CPU the kernels run in the interpreter, which torch.compile cannot trace into, so the
    op is opaque there and ``aot_eager`` suffices to check Dynamo and AOTAutograd; on CUDA
    Inductor compiles the decomposed ``triton_op`` kernels.
    """
    torch._dynamo.reset()
    net = torch.nn.Conv2d(3, 3, 3, padding=1, device=device)
    pred_inputs = _loss_inputs((6, 3, 8, 8), torch.float32, "ve")
    _, y_t, y_tmin, sigma, sigma_min, sigma_max = (t.to(device) for t in pred_inputs)

    def step(backend: str) -> torch.Tensor:
        pred = net(y_t)
        return ambient_fast.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, sigma_max=sigma_max, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    grads = {}
    for backend, fn in (("torch", step), ("triton", compiled)):
        net.zero_grad()
        loss = fn(backend)
        loss.backward()
        grads[backend] = (loss.detach(), [p.grad.clone() for p in net.parameters()])
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads["triton"][1], grads["torch"][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "mean_trained"])
def test_public_ambient_loss_backend_triton(reduction):
    pred, y_t, y_tmin, sigma, sigma_min, sigma_max = _loss_inputs((10, 3, 4, 4), torch.float32, "vp")
    kwargs = dict(schedule="vp", sigma_max=sigma_max, reduction=reduction)
    fast = ambient_fast.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, backend="triton", **kwargs)
    ref = ambient_fast.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, backend="torch", **kwargs)
    torch.testing.assert_close(fast, ref, rtol=2e-6, atol=0)


@pytest.mark.parametrize("method", ["euler", "heun", "churn", "sde"])
def test_public_sample_backend_triton(method):
    """The EDM sampler on per-sample grids, Triton steps against reference steps."""
    batch, num_steps = 4, 5
    lo = torch.tensor([0.002, 0.01, 0.05, 0.2], dtype=torch.float64)
    hi = torch.tensor([80.0, 10.0, 3.0, 1.0], dtype=torch.float64)
    sigmas = ambient_fast.karras_sigmas(num_steps, lo, hi)
    noise = torch.randn(batch, 2, 4, 4, device=DEVICE)
    seeds = torch.arange(batch, device=DEVICE)

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        # Exact denoiser of N(0, 0.25 I) data.
        return x * (0.25 / (0.25 + sigma.to(x.dtype) ** 2)).view(-1, 1, 1, 1)

    options = dict(method=method, S_churn=10.0 if method == "churn" else 0.0, seeds=seeds)
    fast = ambient_fast.sample(denoiser, noise, sigmas, backend="triton", **options)
    ref = ambient_fast.sample(denoiser, noise, sigmas, backend="torch", **options)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Benchmark sizes on a GPU
# ----------------------------------------------------------------------------------------------

GPU_SHAPES = [(512, 3, 32, 32), (64, 4, 64, 64), (8, 3, 512, 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_loss_large(shape, dtype):
    for schedule, target in VARIANTS:
        inputs = _loss_inputs(shape, dtype, schedule)
        _check_loss(inputs, None, LossConfig(schedule, target), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("op", STEPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_step_large(op, dtype, shape):
    args = _step_inputs(op, shape, dtype, channels_last=True)
    reference = getattr(ref_step, f"{op}_step")
    out = getattr(step_module(op), f"{op}_step")(*args, kernel="triton")
    _assert_matches(out, reference(*args), reference(*_cast_step_args(args, torch.float64)), dtype)


# ----------------------------------------------------------------------------------------------
# Checks in the kernel pass (issue 15, item 2)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_block", [MAX_BLOCK, 8], ids=["one_block", "split_rows"])
@pytest.mark.parametrize("with_grad", [False, True])
def test_kernel_pass_writes_the_check_flags(max_block, with_grad):
    """The same rows and flags as the C++ kernel (tests/test_cpu_ops.py::_flag_case); split rows
    combine their chunks' flags with an atomic OR."""
    from tests.test_cpu_ops import _flag_case

    inputs, expected = _flag_case()
    inputs = tuple(t.to(DEVICE) for t in inputs)
    loss = torch.empty(9, device=DEVICE)
    flags = torch.zeros(9, dtype=torch.int32, device=DEVICE)
    grad = empty_rows_like(inputs[0]) if with_grad else None
    loss_kernels.ambient_loss_fwd(loss, grad, *inputs, None, LossConfig(), flags=flags, max_block=max_block)
    assert flags.tolist() == expected
    assert loss[7] == 0 and loss[5] == 0


def test_fp16_gradient_overflow_flag():
    pred, y_t, y_tmin = (torch.randn(2, 4, device=DEVICE).half() for _ in range(3))
    sigma = torch.ones(2, device=DEVICE)
    sigma_min = torch.tensor([0.0, 1.0 - 1e-6], device=DEVICE)
    cfg = LossConfig(elig_scale=1.0)  # s_max = inf: the pole row trains
    loss, flags = torch.empty(2, device=DEVICE), torch.zeros(2, dtype=torch.int32, device=DEVICE)
    grad = empty_rows_like(pred)
    loss_kernels.ambient_loss_fwd(loss, grad, pred, y_t, y_tmin, sigma, sigma_min, torch.zeros_like(sigma), None, cfg,
                                  flags=flags)
    assert flags.tolist() == [1, 1 | 1024] and torch.isfinite(loss).all()
