"""The DDPM schedule against the reference values of the original v1 buffers (../shared/reference/README.md)."""
import math

import pytest
import torch

from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS, make_beta_schedule, q_sample, register_schedule
from ldm.optim.lr_scheduler import LambdaLinearScheduler

# From ../shared/reference/README.md: float32 values at indices 0, 1, 999 of the original checkpoint buffers.
REFERENCE = {
    "betas": (0.000850000011, 0.00085469865, 0.0120000001),
    "alphas_cumprod": (0.999149978, 0.998296022, 0.00466009835),
    "alphas_cumprod_prev": (1, 0.999149978, 0.00471669901),
    "sqrt_alphas_cumprod": (0.9995749, 0.999147654, 0.0682649165),
    "sqrt_one_minus_alphas_cumprod": (0.0291547589, 0.0412791967, 0.997667253),
    "log_one_minus_alphas_cumprod": (-7.07027435, -6.37479305, -0.00467099063),
    "sqrt_recip_alphas_cumprod": (1.00042522, 1.00085306, 14.6488132),
    "sqrt_recipm1_alphas_cumprod": (0.0291671585, 0.0413144119, 14.6146412),
    "posterior_variance": (0, 0.00042635313, 0.0119993174),
    "posterior_log_variance_clipped": (-46.0517006, -7.76024246, -4.42290545),
    "posterior_mean_coef1": (1, 0.501378715, 0.000827997283),
    "posterior_mean_coef2": (0, 0.498621225, 0.993925393),
}


@pytest.fixture(scope="module")
def buffers():
    m = torch.nn.Module()
    register_schedule(m, "linear", 1000, linear_start=0.00085, linear_end=0.012)
    return m


@pytest.mark.parametrize("name", SCHEDULE_BUFFERS)
def test_buffers_match_original_v1_values(buffers, name):
    buf = getattr(buffers, name)
    assert buf.dtype == torch.float32 and buf.shape == (1000,)
    for i, ref in zip((0, 1, 999), REFERENCE[name]):
        assert float(buf[i]) == pytest.approx(ref, rel=2e-6, abs=1e-9), (name, i)


def test_linear_schedule_is_linear_in_sqrt_space():
    betas = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    steps = betas[1:] ** 0.5 - betas[:-1] ** 0.5
    assert steps == pytest.approx((0.012 ** 0.5 - 0.00085 ** 0.5) / 999)


def test_q_sample_closed_form(buffers):
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    out = q_sample(buffers.sqrt_alphas_cumprod, buffers.sqrt_one_minus_alphas_cumprod, x0, t, noise)
    for b, ti in enumerate(t.tolist()):
        betas = [(0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) * i / 999) ** 2 for i in range(ti + 1)]
        abar = math.prod(1 - beta for beta in betas)
        expected = math.sqrt(abar) * x0[b] + math.sqrt(1 - abar) * noise[b]
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-6)


def test_v1_lr_schedule_warms_up_then_stays_constant():
    f = LambdaLinearScheduler(warm_up_steps=[10000], cycle_lengths=[10000000000000], f_start=[1.e-6],
                              f_max=[1.], f_min=[1.])
    assert f(0) == pytest.approx(1e-6)
    assert f(5000) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert f(10000) == pytest.approx(1.0) and f(10 ** 6) == pytest.approx(1.0)
