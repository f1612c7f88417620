"""The native CPU kernels of the one op per function (ambient_fast._C, ``kernel="cpp"``) against the references.

Loss: three-way tolerance (fast vs fp64 reference within twice the low-precision reference's
own error, plus a small atol) over odd shapes, every dtype, VE/VP x x0/eps, ambient and
contraction, every weight mode, masked/clean/locality rows and non-contiguous layouts;
gradients against autograd through the reference. Steps: bitwise where the arithmetic is
IEEE on both sides, three-way where PyTorch's vectorised sqrt is not correctly rounded.
"""

import importlib
import math
import subprocess
import sys
import zlib

import pytest
import torch

import ambient_fast
from ambient_fast.core import solver_step as ref_step
from ambient_fast.core.loss import LossConfig, per_sample_loss_reference, resolve_config
from ambient_fast.kernels import _native
from ambient_fast.kernels.ambient_loss import fused_ambient_loss

pytestmark = pytest.mark.skipif(not _native.available(), reason=f"ambient_fast._C not built: {_native.LOAD_ERROR}")


def ambient_loss_cpp(*args):
    """The one op's C++ kernel through the eager entry point (contract of the reference)."""
    return fused_ambient_loss(*args, kernel="cpp")


def _step(op: str):
    fn = getattr(importlib.import_module(f"ambient_fast.kernels.{op}_step"), f"{op}_step")
    return lambda *args: fn(*args, kernel="cpp")


euler_step_cpp, heun_step_cpp, churn_step_cpp, ancestral_step_cpp = (
    _step(op) for op in ("euler", "heun", "churn", "ancestral")
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (B, ...) shapes: single element, odd sizes, a 1000-element row, 4-D images, and rows of
# 8193 elements that cross the kernels' 8192-element chunk boundary.
SHAPES = [(1, 1), (3, 7), (5, 1000), (4, 3, 5, 7), (3, 8193)]


def _levels(batch: int, schedule: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sigma, sigma_min, sigma_max covering every row kind in rotation: clean, eligible
    corrupt, ineligible with sigma < sigma_min, ineligible just above sigma_min, locality."""
    if schedule == "ve":
        sigma, top = torch.exp(-1.2 + 1.2 * torch.randn(batch, generator=generator)), math.inf
    else:  # VP levels are noise stds in (0, 1)
        sigma, top = 0.1 + 0.8 * torch.rand(batch, generator=generator), 0.99
    kind = torch.arange(batch) % 5
    frac = torch.rand(batch, generator=generator)
    sigma_min = torch.where(kind == 0, torch.zeros(batch), sigma * (0.1 + 0.7 * frac))  # clean / eligible
    sigma_min = torch.where(kind == 2, torch.clamp(sigma * (1.0 + frac), max=top), sigma_min)  # sigma <= sm
    sigma_min = torch.where(kind == 3, sigma * 0.95, sigma_min)  # sm < sigma < 1.1547 sm: masked
    sigma_min = torch.where(kind == 4, torch.clamp(sigma * 1.2, max=top), sigma_min)
    sigma_max = torch.where(kind == 4, sigma * 1.5, torch.zeros(batch))  # locality: trained as clean
    return sigma, sigma_min, sigma_max


def _assert_three_way(fast: torch.Tensor, ref_lowp: torch.Tensor, ref64: torch.Tensor, rtol: float) -> None:
    """``max|fast - ref64| <= 2 max|ref_lowp - ref64| + rtol * max|ref64|`` (STYLE.md)."""
    assert fast.shape == ref64.shape
    err = (fast.double() - ref64).abs().max().item()
    bound = 2 * (ref_lowp.double() - ref64).abs().max().item() + rtol * ref64.abs().max().item()
    assert err <= bound, f"error {err:.3e} above bound {bound:.3e}"


def _rtol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 2e-6


def _config(schedule: str, target: str, mode: str, weight: object) -> LossConfig:
    return resolve_config(schedule, target, mode, 4.0, None, weight, 0.5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule,target", [("ve", "x0"), ("ve", "eps"), ("vp", "x0"), ("vp", "eps")])
@pytest.mark.parametrize("mode", ["ambient", "contraction"])
@pytest.mark.parametrize("weight_mode", ["edm", "none", "tensor"])
def test_loss_and_grad_match_reference(shape, dtype, schedule, target, mode, weight_mode):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, schedule, target, mode, weight_mode)).encode()))
    batch = shape[0]
    pred, y_t, y_tmin = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    sigma, sigma_min, sigma_max = _levels(batch, schedule, gen)
    weight = 0.5 + torch.rand(batch, generator=gen) if weight_mode == "tensor" else None
    cfg = _config(schedule, target, mode, weight if weight is not None else (None if weight_mode == "none" else "edm"))
    upstream = torch.rand(batch, generator=gen)

    def run(fn, tensors, levels):
        p = tensors[0].clone().requires_grad_()
        loss = fn(p, tensors[1], tensors[2], *levels, None if weight is None else weight.to(levels[0].dtype), cfg)
        (loss * upstream.to(loss.dtype)).sum().backward()
        return loss.detach(), p.grad

    levels64 = [t.double() for t in (sigma, sigma_min, sigma_max)]
    fast, fast_grad = run(ambient_loss_cpp, (pred, y_t, y_tmin), (sigma, sigma_min, sigma_max))
    lowp, lowp_grad = run(per_sample_loss_reference, (pred, y_t, y_tmin), (sigma, sigma_min, sigma_max))
    ref, ref_grad = run(per_sample_loss_reference, [t.double() for t in (pred, y_t, y_tmin)], levels64)

    assert fast.dtype == lowp.dtype and fast_grad.dtype == dtype
    _assert_three_way(fast, lowp, ref, _rtol(dtype))
    # The fused gradient is rounded to the storage dtype, then scaled by the upstream
    # gradient (a second rounding for fp16/bf16): allow one unit in the last place.
    grad_rtol = _rtol(dtype) if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
    _assert_three_way(fast_grad, lowp_grad, ref_grad, grad_rtol)
    # Rows that do not train are exactly zero, loss and gradient.
    masked = ref == 0
    assert torch.equal(fast[masked], torch.zeros_like(fast[masked]))
    assert not fast_grad[masked].any()


def test_masked_rows_are_never_read():
    """sigma <= sigma_min rows with NaN data: loss and gradient exactly 0, no NaN anywhere."""
    pred, y_t, y_tmin = (torch.randn(4, 3, 9) for _ in range(3))
    sigma = torch.tensor([0.5, 0.5, 1.0, 2.0])
    sigma_min = torch.tensor([0.0, 0.5, 1.5, 1.0])  # rows 1, 2 never train (sigma <= sigma_min)
    for t in (pred, y_t, y_tmin):
        t[1:3] = float("nan")
    p = pred.clone().requires_grad_()
    loss = ambient_loss_cpp(p, y_t, y_tmin, sigma, sigma_min, torch.zeros(4), None, LossConfig())
    loss.sum().backward()
    assert torch.equal(loss[1:3], torch.zeros(2)) and torch.isfinite(loss).all()
    assert torch.equal(p.grad[1:3], torch.zeros_like(p.grad[1:3])) and torch.isfinite(p.grad).all()


@pytest.mark.parametrize(
    "layout",
    ["batch_slice", "inner_slice", "channels_last", "expanded", "transposed"],
)
def test_loss_non_contiguous_inputs(layout):
    gen = torch.Generator().manual_seed(7)
    base = [torch.randn(10, 3, 6, 8, generator=gen) for _ in range(3)]
    if layout == "batch_slice":  # kept in place: row stride 2 * 144
        tensors = [t[::2] for t in base]
    elif layout == "inner_slice":  # copied
        tensors = [t[:5, :, :, ::2] for t in base]
    elif layout == "channels_last":  # copied
        tensors = [t[:5].contiguous(memory_format=torch.channels_last) for t in base]
    elif layout == "expanded":  # y_tmin is one row broadcast over the batch: row stride 0
        tensors = [base[0][:5], base[1][:5], base[2][:1].expand(5, -1, -1, -1)]
    else:
        tensors = [t[:5].transpose(2, 3) for t in base]
    sigma, sigma_min, sigma_max = _levels(5, "ve", gen)
    pred = tensors[0].clone().requires_grad_() if layout != "batch_slice" else tensors[0].requires_grad_()
    loss = ambient_loss_cpp(pred, tensors[1], tensors[2], sigma, sigma_min, sigma_max, None, LossConfig())
    loss.sum().backward()
    p_ref = tensors[0].detach().contiguous().requires_grad_()
    ref = per_sample_loss_reference(
        p_ref, *(t.contiguous() for t in tensors[1:]), sigma, sigma_min, sigma_max, None, LossConfig()
    )
    ref.sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pred.grad, p_ref.grad, rtol=1e-6, atol=1e-7)


def test_loss_routes_other_gradients_to_reference():
    """A weight (or y_t, levels) that requires grad gets its exact gradient from the reference."""
    pred, y_t, y_tmin = (torch.randn(6, 20) for _ in range(3))
    sigma, sigma_min, sigma_max = _levels(6, "ve", torch.Generator().manual_seed(3))
    grads = []
    for backend in ("cpp", "torch"):
        weight = torch.rand(6, generator=torch.Generator().manual_seed(4)).requires_grad_()
        ambient_fast.ambient_loss(
            pred, y_t, y_tmin, sigma, sigma_min, sigma_max=sigma_max, weight=weight, reduction="sum", backend=backend
        ).backward()
        grads.append(weight.grad)
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ValueError, match="weight requires grad"):
        ambient_loss_cpp(pred, y_t, y_tmin, sigma, sigma_min, sigma_max, torch.rand(6).requires_grad_(), LossConfig())


def test_fused_op_refuses_gradients_it_cannot_give():
    pred = torch.randn(2, 5, requires_grad=True)
    y_t = torch.randn(2, 5, requires_grad=True)
    ones = torch.ones(2)
    options = ("ve", "x0", False, 1.1547, 0.0, True, 0.5, True, "cpp")
    y_tmin = torch.randn(2, 5)
    loss, _ = torch.ops.ambient_fast.ambient_loss(pred, y_t, y_tmin, ones, 0 * ones, 0 * ones, None, *options)
    with pytest.raises(NotImplementedError, match="pred only"):
        loss.sum().backward()
    # Second derivatives are not provided either (create_graph=True).
    p = torch.randn(2, 5, requires_grad=True)
    loss = ambient_loss_cpp(p, torch.randn(2, 5), torch.randn(2, 5), ones, 0 * ones, 0 * ones, None, LossConfig())
    with pytest.raises(NotImplementedError, match="create_graph"):
        torch.autograd.grad(loss.sum(), p, create_graph=True)


def test_loss_mixed_dtypes_compute_like_reference():
    pred = torch.randn(3, 40).to(torch.bfloat16)
    y_t, y_tmin = torch.randn(3, 40), torch.randn(3, 40, dtype=torch.float64)
    sigma, sigma_min, sigma_max = _levels(3, "ve", torch.Generator().manual_seed(5))
    fast = ambient_loss_cpp(pred, y_t, y_tmin, sigma, sigma_min, sigma_max, None, LossConfig())
    ref = per_sample_loss_reference(pred, y_t, y_tmin, sigma, sigma_min, sigma_max, None, LossConfig())
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)


def test_loss_argument_errors():
    x = torch.randn(3, 4)
    levels = (torch.ones(3), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        ambient_loss_cpp(x, x[:2], x, *levels, None, LossConfig())
    with pytest.raises(ValueError, match=r"sigma must have shape \(3,\)"):
        ambient_loss_cpp(x, x, x, torch.ones(2), *levels[1:], None, LossConfig())
    with pytest.raises(ValueError, match="at least one element"):
        ambient_loss_cpp(torch.randn(3, 0), torch.randn(3, 0), torch.randn(3, 0), *levels, None, LossConfig())


# ---- solver steps ----------------------------------------------------------------------


def _step_inputs(shape, dtype, gen):
    batch = shape[0]
    x, d, d_next = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    sigma = torch.exp(torch.randn(batch, generator=gen))
    sigma_next = sigma * torch.rand(batch, generator=gen)
    sigma_next[::3] = 0  # last steps of some rows
    return x, d, d_next, sigma, sigma_next


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_euler_and_heun_are_bitwise_the_reference(shape, dtype):
    gen = torch.Generator().manual_seed(11)
    x, d, d_next, sigma, sigma_next = _step_inputs(shape, dtype, gen)
    assert torch.equal(euler_step_cpp(x, d, sigma, sigma_next), ref_step.euler_step(x, d, sigma, sigma_next))
    d_next[::3] = float("nan")  # rows with sigma_next == 0 must not read denoised_next
    fast = heun_step_cpp(x, d, d_next, sigma, sigma_next)
    assert torch.equal(fast, ref_step.heun_step(x, d, d_next, sigma, sigma_next))
    assert torch.isfinite(fast[::3]).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_churn_and_ancestral_match_reference(shape, dtype):
    """Three-way: PyTorch's vectorised sqrt (Sleef) is not correctly rounded, ours is IEEE."""
    gen = torch.Generator().manual_seed(13)
    x, d, noise, sigma, sigma_next = _step_inputs(shape, dtype, gen)
    wide = [t.double() for t in (x, d, noise)]
    cases = [
        (churn_step_cpp, ref_step.churn_step, (0, 2), (sigma, sigma * 1.3, 1.007)),
        (ancestral_step_cpp, ref_step.ancestral_step, (0, 1, 2), (sigma, sigma_next)),
    ]
    for fast_fn, ref_fn, which, rest in cases:
        tensors = [(x, d, noise)[i] for i in which]
        fast = fast_fn(*tensors, *rest)
        lowp = ref_fn(*tensors, *rest)
        ref = ref_fn(*[wide[i] for i in which], *(r.double() if torch.is_tensor(r) else r for r in rest))
        assert fast.dtype == dtype
        _assert_three_way(fast, lowp, ref, _rtol(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_conversions_match_torch_on_every_bit_pattern(dtype):
    """Every fp16/bf16 bit pattern (subnormals, inf, NaN) widened and stored back, and float32
    results that round, overflow or underflow: torch's bits (NaN payloads aside, which torch's
    own scalar and vector paths do not agree on)."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(64, 1024)

    def assert_same_bits(fast, ref):
        assert torch.equal(fast.isnan(), ref.isnan())
        assert torch.equal(fast[~fast.isnan()].view(torch.int16), ref[~ref.isnan()].view(torch.int16))

    zeros, sigma = torch.zeros_like(every), torch.ones(64)
    # x + 0 * noise: the round trip of every pattern.
    assert_same_bits(
        churn_step_cpp(every, zeros, sigma, sigma), ref_step.churn_step(every, zeros, sigma, sigma)
    )
    # x + (sigma_next - sigma)(x - D)/sigma with operands over the whole range.
    gen = torch.Generator().manual_seed(37)
    denoised = every[torch.randperm(64, generator=gen)]
    sigma = torch.exp(2 * torch.randn(64, generator=gen))
    sigma_next = sigma * 3 * torch.rand(64, generator=gen)
    assert_same_bits(
        euler_step_cpp(every, denoised, sigma, sigma_next),
        ref_step.euler_step(every, denoised, sigma, sigma_next),
    )


def test_steps_non_contiguous_and_mixed_dtypes():
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(8, 3, 4, 4, generator=gen, dtype=torch.float64)[::2]  # batch slice, no copy
    d = torch.randn(4, 4, 4, 3, generator=gen).permute(0, 3, 1, 2)  # float32, permuted: copied
    sigma, sigma_next = torch.rand(4) + 0.5, torch.rand(4) * 0.5
    assert torch.equal(euler_step_cpp(x, d, sigma, sigma_next), ref_step.euler_step(x, d, sigma, sigma_next))
    assert torch.equal(
        heun_step_cpp(x, d, d, sigma, sigma_next), ref_step.heun_step(x, d, d, sigma, sigma_next)
    )


# ---- registration ----------------------------------------------------------------------


def test_opcheck_every_op():
    gen = torch.Generator().manual_seed(19)
    x, d, d_next, sigma, sigma_next = _step_inputs((3, 2, 5), torch.float32, gen)
    sigma_next = sigma_next + 0.1
    sigma_min, sigma_max = sigma * 0.5, torch.zeros(3)
    options = ("ve", "x0", False, math.sqrt(4 / 3), 0.0, True, 0.5)
    ops = torch.ops.ambient_fast
    cases = [
        (ops.ambient_loss.default, (x, d, d_next, sigma, sigma_min, sigma_max, None, *options, False, "cpp")),
        (
            ops.ambient_loss.default,
            (x.clone().requires_grad_(), d, d_next, sigma, sigma_min, sigma_max, torch.rand(3), *options, True, "cpp"),
        ),
        (ops.euler_step.default, (x, d, sigma, sigma_next, "cpp")),
        (ops.heun_step.default, (x, d, d_next, sigma, sigma_next, "cpp")),
        (ops.churn_step.default, (x, d, sigma, sigma * 1.2, 1.0, "cpp")),
        (ops.ancestral_step.default, (x, d, d_next, sigma, sigma_next, "cpp")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_steps_are_not_differentiable():
    x = torch.randn(2, 3, requires_grad=True)
    out = euler_step_cpp(x, torch.randn(2, 3), torch.ones(2), torch.full((2,), 0.5))
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


def test_loss_compiles_fullgraph():
    """torch.compile (CPU inductor) keeps the op opaque and gives the eager values and grads."""
    pred, y_t, y_tmin = (torch.randn(4, 2, 3, 3) for _ in range(3))
    sigma, sigma_min, sigma_max = _levels(4, "ve", torch.Generator().manual_seed(23))
    cfg = LossConfig()

    def step(p):
        return (ambient_loss_cpp(p, y_t, y_tmin, sigma, sigma_min, sigma_max, None, cfg) * 2).mean()

    compiled = torch.compile(step, fullgraph=True)
    p_eager, p_compiled = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    step(p_eager).backward()
    value = compiled(p_compiled)
    value.backward()
    torch.testing.assert_close(value, step(pred))
    torch.testing.assert_close(p_compiled.grad, p_eager.grad)


# ---- public entry points ---------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "mean_trained"])
@pytest.mark.parametrize("buffer", [None, 0.05])
def test_public_ambient_loss_cpp_vs_torch(reduction, buffer):
    gen = torch.Generator().manual_seed(29)
    pred, y_t, y_tmin = (torch.randn(10, 3, 8, 8, generator=gen) for _ in range(3))
    sigma, sigma_min, sigma_max = _levels(10, "ve", gen)
    results = []
    for backend in ("cpp", "torch"):
        p = pred.clone().requires_grad_()
        loss = ambient_fast.ambient_loss(
            p,
            y_t,
            y_tmin,
            sigma,
            sigma_min,
            sigma_max=sigma_max,
            buffer=buffer,
            reduction=reduction,
            backend=backend,
        )
        loss.sum().backward()
        results.append((loss.detach(), p.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-8)


def _gaussian_denoiser(mu: float, var: float):
    """Exact denoiser of N(mu, var I) data: E[x0 | x_sigma] (SPEC 7)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s2 = sigma.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1)) ** 2
        return mu + var / (var + s2) * (x - mu)

    return denoise


@pytest.mark.parametrize("method", ["euler", "heun", "churn", "sde"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_public_sample_cpp_vs_torch(method, dtype):
    noise = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(31), dtype=dtype)
    sigmas = ambient_fast.karras_sigmas(12, 0.002, 20.0)
    seeds = torch.arange(6)
    kwargs = dict(method=method, seeds=seeds, S_churn=10.0 if method == "churn" else 0.0)
    fast = ambient_fast.sample(_gaussian_denoiser(0.3, 0.25), noise, sigmas, backend="cpp", **kwargs)
    ref = ambient_fast.sample(_gaussian_denoiser(0.3, 0.25), noise, sigmas, backend="torch", **kwargs)
    if method in ("euler", "heun"):
        assert torch.equal(fast, ref)
    else:  # the per-row noise scale goes through sqrt (see test_churn_and_ancestral_match_reference)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)


def test_package_works_without_the_extension():
    """Without ambient_fast._C the package imports, CPU ops fall back to the reference with
    one warning, and the sampler uses numpy (fresh interpreter with the module blocked)."""
    script = """
import importlib.abc, sys, warnings

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ambient_fast._C":
            raise ImportError("blocked for the test")

sys.meta_path.insert(0, Block())
import torch, ambient_fast
from ambient_fast.kernels import _native
from ambient_fast.data.sampler import draw_noise_first
assert not _native.available() and "blocked" in _native.LOAD_ERROR
x = torch.randn(2, 3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loss = ambient_fast.ambient_loss(x, x, x, torch.ones(2), torch.zeros(2))
    ambient_fast.ambient_loss(x, x, x, torch.ones(2), torch.zeros(2))
assert sum("not built" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]
indices, _ = draw_noise_first([0.0, 1.0], 10)
assert indices.shape == (10,)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---- checks in the kernel pass (issue 15, item 2) -------------------------------------


def _flag_case():
    """A batch with one problem per row and the check flags the kernels must write for it."""
    gen = torch.Generator().manual_seed(41)
    pred, y_t, y_tmin = (torch.randn(9, 3, 9, generator=gen) for _ in range(3))
    sigma, sigma_min, sigma_max = torch.ones(9), torch.zeros(9), torch.zeros(9)
    pred[1, 0, 3] = math.nan
    y_t[2, 2, 2] = math.inf
    y_tmin[3, 1, 1] = -math.inf
    sigma[4] = -1.0
    sigma_min[5] = math.nan
    sigma_max[6] = -2.0
    sigma_min[7], pred[7, 0, 0] = 5.0, math.nan  # a row that does not train is still scanned
    sigma[8] = 1e20  # coefficients overflow float32
    # 1 trains; 2/4/8 NaN/Inf in pred/y_t/y_tmin; 16/32/64 bad sigma/sigma_min/sigma_max; 256 coefficients.
    flags = [1, 1 | 2, 1 | 4, 1 | 8, 1 | 16, 32, 1 | 64, 2, 1 | 256]
    return (pred, y_t, y_tmin, sigma, sigma_min, sigma_max), flags


@pytest.mark.parametrize("with_grad", [False, True])
def test_kernel_pass_writes_the_check_flags(with_grad):
    from ambient_fast.kernels.ambient_loss import ambient_loss_cpp_fwd

    inputs, expected = _flag_case()
    loss, flags = torch.empty(9), torch.zeros(9, dtype=torch.int32)
    grad = torch.empty(inputs[0].shape) if with_grad else None
    largest, first = ambient_loss_cpp_fwd(loss, grad, *inputs, None, LossConfig(), check=True, flags=flags)
    assert flags.tolist() == expected
    assert (largest, first) == (max(expected), 1)
    assert loss[7] == 0 and loss[5] == 0  # rows that do not train: exactly 0 even with NaN data
    # Without a buffer only the summary comes back; without checks nothing is scanned.
    assert ambient_loss_cpp_fwd(loss, grad, *inputs, None, LossConfig(), check=True) == (max(expected), 1)
    assert ambient_loss_cpp_fwd(loss, grad, *inputs, None, LossConfig()) == (0, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kernel_reduces_the_batch_in_float64_row_order(dtype, reduction):
    """The public mean/sum on CPU comes from the kernel pass itself (no separate reduction op):
    the per-sample losses added in row order in float64, divided by B for the mean, rounded once."""
    g = torch.Generator().manual_seed(3)
    batch = 37
    pred, y_t, y_tmin = (torch.randn(batch, 3, 5, 7, generator=g).to(dtype) for _ in range(3))
    sigma, sigma_min, _ = _levels(batch, "ve", g)
    leaf = pred.clone().requires_grad_(True)
    per_sample = ambient_fast.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, backend="cpp", reduction="none")
    got = ambient_fast.ambient_loss(leaf, y_t, y_tmin, sigma, sigma_min, backend="cpp", reduction=reduction)
    total = 0.0
    for value in per_sample.double().tolist():
        total += value
    expected = torch.tensor(total / (batch if reduction == "mean" else 1), dtype=torch.float64).to(per_sample.dtype)
    assert got.dim() == 0 and got.dtype == per_sample.dtype
    assert got.item() == expected.item()
    reference = per_sample_loss_reference(
        pred.double(), y_t.double(), y_tmin.double(), sigma.double(), sigma_min.double(), torch.zeros(batch).double(),
        None, LossConfig(),
    )
    want = reference.mean() if reduction == "mean" else reference.sum()
    low = dtype in (torch.bfloat16, torch.float16)
    assert math.isclose(got.item(), want.item(), rel_tol=2e-2 if low else 1e-5)
    got.backward()  # the gradient of the kernel's reduction is the one written in the same pass
    ref_leaf = pred.double().requires_grad_(True)
    ref = per_sample_loss_reference(
        ref_leaf, y_t.double(), y_tmin.double(), sigma.double(), sigma_min.double(), torch.zeros(batch).double(),
        None, LossConfig(),
    )
    (ref.mean() if reduction == "mean" else ref.sum()).backward()
    tol = 2e-2 if low else 1e-5
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=tol, atol=tol * ref_leaf.grad.abs().max().item())


def test_public_loss_names_a_nan_in_a_row_that_does_not_train():
    (pred, y_t, y_tmin, sigma, sigma_min, sigma_max), _ = _flag_case()
    clean = [0, 7]
    with pytest.raises(ValueError, match=r"pred: non-finite value \(NaN or Inf\) in sample 1"):
        ambient_fast.ambient_loss(pred[clean], y_t[clean], y_tmin[clean], sigma[clean], sigma_min[clean], backend="cpp")


# ---- ambient-fast bench kernels (issue 15, item 6) ------------------------------------


def test_bench_kernels_command_reports_every_impl_as_json(capsys):
    import json

    from ambient_fast.cli import main

    code = main(["bench", "kernels", "--op", "loss,euler", "--shape", "2,3,4,4", "--dtype", "fp32",
                 "--rounds", "2", "--warmup", "0", "--no-compile", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = {(r["op"], r["phase"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {(op, phase, impl) for op, phase in (("loss", "fwd"), ("loss", "fwd+bwd"), ("euler", "fwd"))
                         for impl in ("fused", "eager")}
    loss = rows[("loss", "fwd+bwd", "fused")]
    assert loss["shape"] == [2, 3, 4, 4] and loss["bytes"] == 4 * 2 * 48 * 4 and loss["gbps"] > 0
    assert rows[("loss", "fwd", "eager")]["vs_eager"] == 1.0
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--shape", "3,4"])
    assert "expected C,H,W or B,C,H,W" in capsys.readouterr().err
