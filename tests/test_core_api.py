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
