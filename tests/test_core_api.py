"""Public API contracts of the reference: validation, dtypes, shapes, noise, grids, wrappers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import ambient_fast as af
from ambient_fast.core.noise import STREAM_NATURE, derive_seeds


def _batch(b=4, shape=(3, 5), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred, y_t, y_tmin = (torch.randn(b, *shape, generator=g).to(dtype) for _ in range(3))
    sigma = torch.exp(torch.randn(b, generator=g)) + 0.5
    sigma_min = torch.rand(b, generator=g) * 0.3
    return pred, y_t, y_tmin, sigma, sigma_min


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field", ["pred", "y_t", "y_tmin", "sigma", "sigma_min"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_names_argument_and_sample(field, bad):
    args = dict(zip(["pred", "y_t", "y_tmin", "sigma", "sigma_min"], _batch(), strict=True))
    args[field] = args[field].clone()
    args[field][2] = bad
    with pytest.raises(ValueError, match=rf"{field}: non-finite.*sample 2"):
        af.ambient_loss(args.pop("pred"), args.pop("y_t"), args.pop("y_tmin"), args.pop("sigma"), args.pop("sigma_min"))


def test_bad_levels_name_the_first_bad_sample():
    pred, y_t, y_tmin, sigma, sigma_min = _batch()
    with pytest.raises(ValueError, match=r"sigma_min: must be >= 0, sample 1"):
        af.ambient_loss(pred, y_t, y_tmin, sigma, torch.tensor([0.1, -0.2, 0.1, -1.0]))
    with pytest.raises(ValueError, match=r"sigma: must be > 0, sample 3"):
        af.ambient_loss(pred, y_t, y_tmin, torch.tensor([1.0, 1.0, 1.0, 0.0]), sigma_min)
    with pytest.raises(ValueError, match=r"sigma: VP noise std must be < 1, sample 0"):
        af.ambient_loss(pred, y_t, y_tmin, torch.tensor([1.5, 0.5, 0.5, 0.5]), sigma_min, schedule="vp")
    with pytest.raises(ValueError, match=r"sigma_max: must be >= 0, sample 2"):
        af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, sigma_max=torch.tensor([0.0, 0.0, -1.0, 0.0]))


def test_layout_mismatches_are_named():
    pred, y_t, y_tmin, sigma, sigma_min = _batch()
    with pytest.raises(ValueError, match=r"y_t: shape"):
        af.ambient_loss(pred, y_t[:, :2], y_tmin, sigma, sigma_min)
    with pytest.raises(ValueError, match=r"y_tmin: dtype"):
        af.ambient_loss(pred, y_t, y_tmin.double(), sigma, sigma_min)
    with pytest.raises(ValueError, match=r"sigma: expected shape \(4,\)"):
        af.ambient_loss(pred, y_t, y_tmin, sigma[:3], sigma_min)
    with pytest.raises(ValueError, match=r"weight: expected shape \(4,\)"):
        af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, weight=torch.ones(5))
    with pytest.raises(ValueError, match=r"schedule must be"):
        af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, schedule="vpsde")
    with pytest.raises(ValueError, match=r"s_max must be > 1"):
        af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, s_max=1.0)


def _detailed_layout_checks(pred, y_t, y_tmin, sigma, sigma_min):
    from ambient_fast.core.validation import check_per_sample_layout, check_same_layout

    check_same_layout("pred", pred, y_t=y_t, y_tmin=y_tmin)
    check_per_sample_layout("sigma", sigma, pred.shape[0], pred.device)
    check_per_sample_layout("sigma_min", sigma_min, pred.shape[0], pred.device)


@pytest.mark.parametrize(
    "perturb",
    [
        "none", "y_t shape", "y_tmin shape", "y_t dtype", "y_tmin dtype", "pred 0-d", "pred empty-batch",
        "pred int", "sigma shape", "sigma_min shape", "sigma int", "sigma_min 2-d", "sigma float", "y_t list",
        "pred fp16", "pred bf16", "pred fp64", "sigma fp64", "y_t meta", "sigma meta", "sigma_min meta",
    ],
)
def test_the_loss_fast_layout_check_accepts_exactly_what_the_detailed_checks_accept(perturb):
    """``loss._check_layout`` tests the common case in one expression and falls back to the
    named checks; it must refuse (with the named error) every layout they refuse."""
    from ambient_fast.loss import _check_layout

    args = dict(zip(["pred", "y_t", "y_tmin", "sigma", "sigma_min"], _batch(), strict=True))
    what, change = perturb.rsplit(" ", 1) if perturb != "none" else ("pred", "none")
    t = args[what]
    args[what] = {
        "none": lambda: t,
        "shape": lambda: t[:, :2] if t.dim() > 1 else t[:3],
        "dtype": lambda: t.double(),
        "0-d": lambda: t[0, 0],
        "empty-batch": lambda: t[:0],
        "int": lambda: t.long(),
        "2-d": lambda: t[:, None],
        "float": lambda: 0.5,
        "list": lambda: t.tolist(),
        "fp16": lambda: t.half(),
        "bf16": lambda: t.bfloat16(),
        "fp64": lambda: t.double(),
        "meta": lambda: t.to("meta"),
    }[change]()
    if change in ("fp16", "bf16", "fp64") and what == "pred":
        args["y_t"], args["y_tmin"] = args["y_t"].to(args["pred"].dtype), args["y_tmin"].to(args["pred"].dtype)
    try:
        _detailed_layout_checks(*args.values())
        expected = None
    except (TypeError, ValueError) as error:
        expected = (type(error), str(error))
    if expected is None:
        _check_layout(*args.values(), None, None)
    else:
        with pytest.raises(expected[0]) as raised:
            _check_layout(*args.values(), None, None)
        assert str(raised.value) == expected[1]
    assert (expected is None) == (perturb in ("none", "pred fp16", "pred bf16", "pred fp64", "sigma fp64"))


def test_no_eligible_sample_gives_zero_with_a_warning_not_nan():
    pred, y_t, y_tmin, _, _ = _batch()
    sigma = torch.full((4,), 0.5)
    sigma_min = torch.full((4,), 1.0)  # sigma < sigma_min: nobody trains
    with pytest.warns(UserWarning, match="no sample in the batch is eligible"):
        loss = af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min)
    assert loss.item() == 0.0
    pred.requires_grad_(True)
    with pytest.warns(UserWarning):
        af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min).backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_restore_rejects_raising_the_level():
    y0 = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"sigma_out: must be <= sigma_min.*sample 1"):
        af.restore(lambda x, s: x, y0, torch.tensor([1.0, 0.5, 1.0]), torch.tensor([0.1, 0.6, 0.0]),
                   seeds=torch.arange(3))


# ----------------------------------------------------------------------------- the loss contract


def test_masking_rules():
    sigma = torch.tensor([1.0, 1.0, 1.0, 0.3, 0.3, 2.0])
    sigma_min = torch.tensor([0.0, 0.8, 0.9, 0.5, 0.5, 1.0])
    sigma_max = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.4, 0.0])
    # multiplicative rule with s_max = 4: sigma > 1.1547 sm
    assert af.eligible(sigma, sigma_min, sigma_max).tolist() == [True, True, False, False, True, True]
    # additive buffer: sigma > sm + 0.15
    assert af.eligible(sigma, sigma_min, sigma_max, buffer=0.15).tolist() == [True, True, False, False, True, True]
    assert af.eligible(sigma, sigma_min, None, buffer=0.25).tolist() == [True, False, False, False, False, True]


def test_locality_rows_train_as_clean_and_contraction_uses_plain_coefficients():
    g = torch.Generator().manual_seed(1)
    pred, y_t, y_tmin = (torch.randn(3, 8, dtype=torch.float64, generator=g) for _ in range(3))
    sigma = torch.tensor([0.3, 2.0, 2.0], dtype=torch.float64)
    sigma_min = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    sigma_max = torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    loss = af.ambient_loss(
        pred, y_t, y_tmin, sigma, sigma_min, sigma_max=sigma_max, weight=None, reduction="none"
    )
    assert torch.allclose(loss[0], ((pred[0] - y_tmin[0]) ** 2).mean())  # locality: sm treated as 0
    contraction = af.ambient_loss(
        pred, y_t, y_tmin, sigma, sigma_min, weight=None, mode="contraction", reduction="none"
    )
    assert torch.allclose(contraction[1], ((pred[1] - y_tmin[1]) ** 2).mean())
    assert not torch.allclose(loss[1], contraction[1])


def test_reductions_and_user_weight():
    pred, y_t, y_tmin, sigma, sigma_min = _batch(6)
    sigma_min[1] = 10.0  # does not train
    per = af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, reduction="none")
    assert per[1] == 0 and per.dtype == torch.float32 and per.shape == (6,)
    torch.testing.assert_close(af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min), per.mean())
    torch.testing.assert_close(af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, reduction="sum"), per.sum())
    torch.testing.assert_close(
        af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, reduction="mean_trained"), per.sum() / 5
    )
    w = torch.rand(6)
    plain = af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, weight=None, reduction="none")
    weighted = af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, weight=w, reduction="none")
    torch.testing.assert_close(weighted, w * plain)


def test_coefficients_are_finite_for_rows_that_do_not_train():
    pred, y_t, y_tmin, _, _ = _batch(3)
    sigma = torch.tensor([1.0, 1.0, 1.0])
    sigma_min = torch.tensor([1.0, 2.0, 0.2])  # s == sm and s < sm would divide by <= 0
    pred.requires_grad_(True)
    loss = af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pred.grad).all()
    assert loss[:2].eq(0).all() and pred.grad[:2].eq(0).all()


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 5),
    trailing=st.lists(st.integers(1, 7), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    schedule=st.sampled_from(["ve", "vp"]),
    target=st.sampled_from(["x0", "eps"]),
)
def test_low_precision_inputs_accumulate_in_fp32(batch, trailing, dtype, schedule, target):
    """The loss of bf16/fp16 inputs equals the fp64 loss of the same (rounded) values to fp32 precision."""
    g = torch.Generator().manual_seed(batch * 31 + len(trailing))
    shape = (batch, *trailing)
    pred, y_t, y_tmin = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    sigma = torch.rand(batch, generator=g) * 0.5 + 0.4
    sigma_min = torch.rand(batch, generator=g) * 0.3
    kw = dict(schedule=schedule, target=target, reduction="none", weight=None)
    got = af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, **kw)
    want = af.ambient_loss(pred.double(), y_t.double(), y_tmin.double(), sigma.double(), sigma_min.double(), **kw)
    assert got.dtype == torch.float32 and got.shape == (batch,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- noise


def test_fixed_noise_is_per_sample_and_batch_independent():
    y0 = torch.zeros(6, 2, 3)
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    sigma = torch.full((6,), 2.0)
    sm = torch.full((6,), 1.0)
    _, a = af.noisy_pair(y0, sigma, sm, sample_ids=ids)
    _, b = af.noisy_pair(y0[[4, 1]], sigma[:2], sm[:2], sample_ids=ids[[4, 1]])
    torch.testing.assert_close(b, a[[4, 1]])  # same id, same frozen noise, any batch
    _, c = af.noisy_pair(y0, sigma, sm, sample_ids=ids, noise_seed=1)
    assert not torch.allclose(a, c)  # the run seed changes it
    y_t1, _ = af.noisy_pair(y0, sigma, sm, sample_ids=ids)
    y_t2, _ = af.noisy_pair(y0, sigma, sm, sample_ids=ids)
    assert not torch.allclose(y_t1, y_t2)  # the extra noise is fresh


def test_counter_noise_is_standard_normal_and_independent():
    seeds = derive_seeds(torch.arange(200), 0)
    x = af.sample_normal(seeds, (500,), stream=STREAM_NATURE, dtype=torch.float64)
    flat = x.flatten().numpy()
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    corr = np.corrcoef(x[:, :-1].flatten().numpy(), x[:, 1:].flatten().numpy())[0, 1]
    assert abs(corr) < 0.01  # 1e5 pairs: SE 0.003
    rows = np.corrcoef(x[:50].numpy())
    assert np.abs(rows[np.triu_indices(50, 1)]).max() < 0.2  # 500 elements per row: SE 0.045
    other = af.sample_normal(seeds, (500,), stream=STREAM_NATURE + 1, dtype=torch.float64)
    assert abs(np.corrcoef(flat, other.flatten().numpy())[0, 1]) < 0.01


def test_vp_noisy_pair_has_the_vp_marginal():
    n = 200_000
    y0 = torch.full((n, 1), 0.8, dtype=torch.float64)
    s = torch.full((n,), 0.6, dtype=torch.float64)
    sm = torch.full((n,), 0.3, dtype=torch.float64)
    y_t, y_tmin = af.noisy_pair(y0, s, sm, "vp", generator=torch.Generator().manual_seed(0))
    # y_t = sqrt(1 - s^2) y0 + s eps: mean 0.64, std 0.6 (SE 0.0014 / 0.001).
    assert abs(float(y_t.mean()) - 0.64) < 0.006 and abs(float(y_t.std()) - 0.6) < 0.005
    assert abs(float(y_tmin.mean()) - 0.8 * math.sqrt(1 - 0.09)) < 0.006 and abs(float(y_tmin.std()) - 0.3) < 0.005


# ----------------------------------------------------------------------------- grids, wrappers


def test_karras_grid_matches_the_formula():
    n, lo, hi, rho = 18, 0.002, 80.0, 7.0
    want = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)] + [0.0]
    got = af.karras_sigmas(n, lo, hi)
    assert got.dtype == torch.float64 and got.shape == (n + 1,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    per_sample = af.karras_sigmas(
        n, torch.tensor([0.002, 0.002], dtype=torch.float64), torch.tensor([80.0, 1.2], dtype=torch.float64)
    )
    assert per_sample.shape == (2, n + 1)
    np.testing.assert_allclose(per_sample[0].numpy(), want, rtol=1e-12)
    assert per_sample[1, 0] == pytest.approx(1.2) and per_sample[1, -2] == pytest.approx(0.002)
    assert af.karras_sigmas(1, 0.1, 2.0).tolist() == [2.0, 0.0]


def test_edm_precond_formula():
    class Raw(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.7))

        def forward(self, x, c_noise, labels=None):
            return self.w * x + c_noise.view(-1, 1)

    x = torch.randn(5, 4)
    sigma = torch.exp(torch.randn(5))
    d = af.EDMPrecond(Raw())(x, sigma)
    sd = 0.5
    s = sigma.view(-1, 1)
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
    want = c_skip * x + c_out * (0.7 * c_in * x + torch.log(s) / 4)
    torch.testing.assert_close(d, want)


def test_ambient_loss_callable_matches_the_functional_form():
    class Scale(torch.nn.Module):
        def forward(self, x, c_noise, labels=None):
            return 0.3 * x

    net = af.EDMPrecond(Scale())
    images = torch.randn(8, 1, 4, 4)
    sigma_min = torch.tensor([0.0, 0.5] * 4)
    sigma = torch.full((8,), 1.5)
    ids = torch.arange(8)
    loss_fn = af.AmbientLoss()
    gen = torch.Generator().manual_seed(3)
    got = loss_fn(net, images, sigma_min, sigma=sigma, sample_ids=ids, generator=gen)
    gen = torch.Generator().manual_seed(3)
    y_t, y_tmin = af.noisy_pair(images, sigma, sigma_min, sample_ids=ids, generator=gen)
    want = af.ambient_loss(net(y_t, sigma), y_t, y_tmin, sigma, sigma_min, reduction="none")
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="sample_ids"):
        loss_fn(net, images, sigma_min)


def test_restore_passes_clean_samples_through_and_is_batch_independent():
    den = lambda x, s: 0.5 * x  # noqa: E731
    y0 = torch.randn(6, 2, 2, dtype=torch.float32)
    sm = torch.tensor([0.0, 0.7, 0.0, 1.2, 0.3, 0.0])
    seeds = torch.arange(100, 106)
    full = af.restore(den, y0, sm, 0.0, seeds=seeds)
    clean = sm == 0
    assert torch.equal(full[clean], y0[clean])
    part = af.restore(den, y0[[3, 1]], sm[[3, 1]], 0.0, seeds=seeds[[3, 1]])
    torch.testing.assert_close(part, full[[3, 1]])
    stop = af.restore(den, y0, sm, sm / 2, seeds=seeds, method="euler")
    assert torch.equal(stop[clean], y0[clean]) and torch.isfinite(stop).all()


def test_ambient_loss_callable_contraction_targets_the_corrupt_sample_itself():
    """Contraction (Ambient-o's released code): the plain loss with the corrupt image as target,
    no nature noise added; locality rows (sigma < sigma_max) are likewise trained as clean."""

    class Zero(torch.nn.Module):
        def forward(self, x, c_noise, labels=None):
            return torch.zeros_like(x)

    net = af.EDMPrecond(Zero())  # D(y_t) = c_skip y_t, so the loss depends on the target only through y0
    images = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    sigma_min = torch.tensor([0.5, 0.5, 0.0, 0.5], dtype=torch.float64)
    sigma = torch.tensor([2.0, 2.0, 2.0, 0.3], dtype=torch.float64)
    sigma_max = torch.tensor([0.0, 0.0, 0.0, 0.4], dtype=torch.float64)
    ids = torch.arange(4)
    for mode in ("contraction", "ambient"):
        gen = torch.Generator().manual_seed(5)
        got = af.AmbientLoss(mode=mode)(
            net, images, sigma_min, sigma=sigma, sigma_max=sigma_max, sample_ids=ids, generator=gen
        )
        gen = torch.Generator().manual_seed(5)
        eta = torch.randn(images.shape, dtype=torch.float64, generator=gen)  # nature noise is id-seeded
        y_t = images + sigma.view(-1, 1, 1, 1) * eta
        lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        plain = lam * ((net(y_t, sigma) - images) ** 2).mean(dim=(1, 2, 3))
        rows = [0, 1, 2, 3] if mode == "contraction" else [2, 3]  # clean and locality rows are plain
        torch.testing.assert_close(got[rows], plain[rows])


# ----------------------------------------------------------------------------- no silent NaN (issue 15, item 4)
# Each case found by fuzzing the public API becomes one clear error naming the argument (or a
# documented finite result). The fused kernels find the value problems in their own pass; the
# public call runs them by default ("auto": C++ here).

BACKENDS_UNDER_TEST = ["auto", "triton"]  # C++ and the Triton kernel (interpreted on CPU)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("bad_sigma", [1e20, 1e-20])
def test_extreme_sigma_in_float32_is_an_error_naming_sigma(backend, bad_sigma):
    pred, y_t, y_tmin, sigma, sigma_min = _batch()
    sigma = sigma.clone()
    sigma[1], sigma_min = bad_sigma, sigma_min * 0
    with pytest.raises(ValueError, match=r"sigma: the loss coefficients of sample 1 .* not finite in torch.float32"):
        af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_float64_level_that_overflows_on_the_cast_to_float32_is_an_error(backend):
    pred, y_t, y_tmin, sigma, sigma_min = _batch()
    sigma = sigma.double()
    sigma[3] = 1e40  # finite in float64, inf in the float32 compute dtype
    with pytest.raises(ValueError, match=r"sigma: the loss coefficients of sample 3"):
        af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min.double(), backend=backend)


def test_reference_backend_refuses_a_non_finite_loss():
    pred, y_t, y_tmin, sigma, sigma_min = _batch()
    sigma = sigma.clone()
    sigma[2] = 1e20
    with pytest.raises(ValueError, match=r"sample 2"):
        af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min * 0, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("rule", [dict(s_max=math.inf), dict(buffer=0.0)])
def test_fp16_gradient_overflow_near_the_pole_is_an_error(backend, rule):
    """sigma a hair above sigma_min: the coefficients are ~1e6, the fp16 gradient overflows."""
    g = torch.Generator().manual_seed(2)
    pred, y_t, y_tmin = (torch.randn(2, 4, generator=g).half() for _ in range(3))
    sigma = torch.tensor([1.0, 1.0])
    sigma_min = torch.tensor([0.0, 1.0 - 1e-6])
    leaf = pred.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"pred: d loss / d pred of sample 1 overflows torch.float16"):
        af.ambient_loss(leaf, y_t, y_tmin, sigma, sigma_min, backend=backend, **rule)
    # Without a gradient the same loss is finite (float32 accumulation) and returned.
    assert torch.isfinite(af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, backend=backend, **rule))


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_finite_data_whose_loss_overflows_is_an_error(backend):
    pred, y_t, y_tmin, sigma, sigma_min = _batch()
    pred = pred.clone()
    pred[0] = 3e38  # finite float32, but its square is not
    with pytest.raises(ValueError, match=r"pred: the loss of sample 0 overflows torch.float32"):
        af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_validate_false_skips_the_checks(backend):
    pred, y_t, y_tmin, sigma, sigma_min = _batch()
    pred = pred.clone()
    pred[1] = math.nan
    loss = af.ambient_loss(pred, y_t, y_tmin, sigma, sigma_min, backend=backend, validate=False, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()


def test_python_float_where_a_tensor_belongs_names_the_argument():
    pred, y_t, y_tmin, sigma, sigma_min = _batch()
    with pytest.raises(TypeError, match=r"sigma: expected a tensor of shape \(4,\), got float"):
        af.ambient_loss(pred, y_t, y_tmin, 1.0, sigma_min)
    with pytest.raises(TypeError, match=r"y_tmin: expected a tensor"):
        af.ambient_loss(pred, y_t, 0.0, sigma, sigma_min)
    with pytest.raises(TypeError, match=r"sigma_min: expected a tensor"):
        af.ambient_loss(pred, y_t, y_tmin, sigma, 0.0)
    with pytest.raises(TypeError, match=r"y0: expected a tensor"):
        af.noisy_pair(0.5, sigma, sigma_min)
    with pytest.raises(TypeError, match=r"noise: expected a tensor"):
        af.sample(lambda x, s: x, 1.0, af.karras_sigmas(4, 0.1, 1.0))
    with pytest.raises(TypeError, match=r"sigma_min: expected a tensor"):
        af.restore(lambda x, s: x, pred, 0.5, seeds=torch.arange(4))


def test_empty_batch():
    empty = torch.empty(0, 3)
    levels = torch.empty(0)
    with pytest.raises(ValueError, match=r"pred: expected a batch \(B, \.\.\.\) with B >= 1"):
        af.ambient_loss(empty, empty, empty, levels, levels)
    with pytest.raises(ValueError, match=r"y0: expected a batch \(B, \.\.\.\) with B >= 1"):
        af.noisy_pair(empty, levels, levels)
    # Samplers: an empty batch is a documented empty result.
    assert af.sample(lambda x, s: x, empty, af.karras_sigmas(4, 0.1, 1.0)).shape == (0, 3)
    assert af.restore(lambda x, s: x, empty, levels, seeds=torch.arange(0)).shape == (0, 3)


def test_noisy_pair_checks_y0_ids_and_the_level_order():
    y0 = torch.randn(3, 4)
    sigma, sigma_min = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.5, 0.5, 0.5])
    bad = y0.clone()
    bad[2, 1] = math.inf
    with pytest.raises(ValueError, match=r"y0: non-finite value \(NaN or Inf\) in sample 2"):
        af.noisy_pair(bad, sigma, sigma_min)
    with pytest.raises(ValueError, match=r"sample_ids: expected one id per sample, shape \(3,\), got \(5,\)"):
        af.noisy_pair(y0, sigma, sigma_min, sample_ids=torch.arange(5))
    with pytest.raises(ValueError, match=r"eta_seeds: expected one id per sample"):
        af.noisy_pair(y0, sigma, sigma_min, eta_seeds=torch.arange(2))
    with pytest.raises(ValueError, match=r"sigma: must be >= sigma_min .* sample 1 has sigma=0.2 < sigma_min=0.5"):
        af.noisy_pair(y0, torch.tensor([1.0, 0.2, 0.5]), sigma_min)
    y_t, y_tmin = af.noisy_pair(y0, sigma, sigma_min)  # sigma == sigma_min is allowed: y_t == y_tmin there
    assert torch.equal(y_t[2], y_tmin[2]) and not torch.equal(y_t[0], y_tmin[0])


def test_sample_checks_noise_and_start():
    sigmas = af.karras_sigmas(4, 0.1, 1.0)
    noise = torch.randn(3, 2)
    bad = noise.clone()
    bad[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"noise: non-finite value \(NaN or Inf\) in sample 1"):
        af.sample(lambda x, s: x, bad, sigmas)
    with pytest.raises(ValueError, match=r"start: non-finite value \(NaN or Inf\) in sample 1"):
        af.sample(lambda x, s: x, noise, sigmas, start=bad)
    with pytest.raises(ValueError, match=r"start: shape \(2, 2\) differs from noise's \(3, 2\)"):
        af.sample(lambda x, s: x, noise, sigmas, start=noise[:2])


def test_restore_checks_start_noise():
    y0, sm, seeds = torch.randn(3, 2), torch.tensor([0.5, 0.5, 0.0]), torch.arange(3)
    bad = torch.randn(3, 2)
    bad[0, 1] = math.inf
    with pytest.raises(ValueError, match=r"start_noise: non-finite value \(NaN or Inf\) in sample 0"):
        af.restore(lambda x, s: x, y0, sm, seeds=seeds, start_noise=bad)
    with pytest.raises(ValueError, match=r"start_noise: shape \(3, 3\) differs from y0's \(3, 2\)"):
        af.restore(lambda x, s: x, y0, sm, seeds=seeds, start_noise=torch.randn(3, 3))


@settings(max_examples=60, deadline=None)
@given(
    log_sigma=st.lists(st.floats(-25, 25), min_size=1, max_size=4),
    ratio=st.sampled_from([0.0, 0.5, 0.999999, 1.0, 1.5]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    level_dtype=st.sampled_from([torch.float32, torch.float64]),
    rule=st.sampled_from([dict(), dict(s_max=math.inf), dict(buffer=0.0)]),
    scale=st.sampled_from([1.0, 1e4, 1e30]),
    backend=st.sampled_from(["auto", "torch"]),
)
def test_fuzz_public_loss_is_finite_or_one_clear_error(log_sigma, ratio, dtype, level_dtype, rule, scale, backend):
    """Fuzzed levels (1e-25 .. 1e25, at and near the pole), dtypes, rules and data scales: the
    public loss is finite with a finite gradient, or raises one ValueError naming an argument."""
    batch = len(log_sigma)
    g = torch.Generator().manual_seed(batch)
    finite_max = min(torch.finfo(dtype).max, torch.finfo(torch.float32).max)
    pred, y_t, y_tmin = ((torch.randn(batch, 5, generator=g) * scale).clamp(-finite_max, finite_max).to(dtype)
                         for _ in range(3))
    sigma = (10.0 ** torch.tensor(log_sigma, dtype=torch.float64)).to(level_dtype)
    sigma_min = sigma * ratio
    leaf = pred.clone().requires_grad_(True)
    try:
        loss = af.ambient_loss(leaf, y_t, y_tmin, sigma, sigma_min, backend=backend, **rule)
        loss.backward()
    except ValueError as err:
        assert str(err).split(":")[0] in ("pred", "y_t", "y_tmin", "sigma", "sigma_min"), str(err)
        return
    assert torch.isfinite(loss), (loss, sigma, sigma_min)
    if backend == "auto":  # the reference does not check its (autograd) gradient
        assert torch.isfinite(leaf.grad).all()


# ----------------------------------------------------------------------------- method names (issue 15, item 5)


def test_method_names_and_their_deprecated_alias():
    den = lambda x, s: 0.5 * x  # noqa: E731
    noise, sigmas, seeds = torch.randn(3, 2), af.karras_sigmas(6, 0.05, 2.0), torch.arange(3)
    churn = af.sample(den, noise, sigmas, method="churn", S_churn=5.0, seeds=seeds)
    with pytest.warns(DeprecationWarning, match=r"sample: method='stochastic' is deprecated, use method='churn'"):
        old = af.sample(den, noise, sigmas, method="stochastic", S_churn=5.0, seeds=seeds)
    assert torch.equal(churn, old)
    y0, sm = torch.randn(3, 2), torch.tensor([0.5, 0.3, 0.0])
    sde = af.restore(den, y0, sm, seeds=seeds, method="sde")
    with pytest.warns(DeprecationWarning, match=r"restore: method='stochastic' is deprecated, use method='sde'"):
        old = af.restore(den, y0, sm, seeds=seeds, method="stochastic")
    assert torch.equal(sde, old)
    with pytest.raises(ValueError, match=r"sample: method must be one of"):
        af.sample(den, noise, sigmas, method="ancestral")

    from ambient_fast.restoration.sampler import METHODS, SamplerConfig

    assert "sde" in METHODS and "stochastic" in METHODS  # the CLI's --method choices
    with pytest.warns(DeprecationWarning, match="SamplerConfig"):
        assert SamplerConfig(method="stochastic").method == "sde"
