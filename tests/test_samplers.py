"""DDIM and PLMS: timestep selection in closed form, and a DDIM trajectory against diffusers' DDIMScheduler
driving diffusers' UNet (weights converted by diffusers' own converter)."""
import pytest
import torch

from conftest import diffusers_unet, rel_err
from ldm.models.diffusion.ddim import DDIMSampler, make_ddim_timesteps
from ldm.models.diffusion.plms import PLMSSampler, multistep_eps


def test_uniform_timesteps_as_the_original_selects_them():
    assert make_ddim_timesteps(50).tolist() == list(range(1, 1000, 20))
    assert make_ddim_timesteps(1).tolist() == [1]
    # range(0, 1000, 142) has 8 entries: the original takes 8 steps for S=7, and so do we.
    assert make_ddim_timesteps(7).tolist() == [1 + 142 * i for i in range(8)]


def test_timestep_1000_is_clamped_with_a_warning():
    with pytest.warns(UserWarning, match="selects timestep 1000"):
        steps = make_ddim_timesteps(3)
    assert steps.tolist() == [1, 334, 667, 999]


@pytest.mark.parametrize("bad", [0, 1001])
def test_step_count_out_of_range(bad):
    with pytest.raises(ValueError, match="ddim_steps"):
        make_ddim_timesteps(bad)


def test_adams_bashforth_weights():
    e = [torch.full((1,), float(v)) for v in (1, 2, 3, 4)]  # oldest .. newest
    assert float(multistep_eps(e[3], e[2:3])) == pytest.approx((3 * 4 - 3) / 2)
    assert float(multistep_eps(e[3], e[1:3])) == pytest.approx((23 * 4 - 16 * 3 + 5 * 2) / 12)
    assert float(multistep_eps(e[3], e[0:3])) == pytest.approx((55 * 4 - 59 * 3 + 37 * 2 - 9 * 1) / 24)


class ConstantEps(torch.nn.Module):
    """A denoiser whose eps never changes: every linear multistep combination of it is that same eps, so PLMS
    must follow DDIM(eta=0) exactly (the weights of each Adams-Bashforth order sum to one)."""

    def __init__(self, schedule_model):
        super().__init__()
        self.register_buffer("alphas_cumprod", schedule_model.alphas_cumprod)
        self.num_timesteps = 1000
        self.eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    def apply_model(self, x, t, c):
        return self.eps.expand_as(x)


def test_plms_equals_ddim_for_a_constant_eps(tiny_model):
    model = ConstantEps(tiny_model)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ddim, _ = DDIMSampler(model).sample(10, 2, (4, 8, 8), x_T=x_T, verbose=False)
    plms, _ = PLMSSampler(model).sample(10, 2, (4, 8, 8), x_T=x_T, verbose=False)
    torch.testing.assert_close(plms, ddim, rtol=1e-5, atol=1e-5)


def test_seeded_sampling_is_deterministic_with_eta(tiny_model):
    c = tiny_model.get_learned_conditioning(["a dog"])
    runs = [DDIMSampler(tiny_model).sample(5, 1, (4, 8, 8), conditioning=c, eta=1.0, verbose=False,
                                           generator=torch.Generator().manual_seed(9))[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_ddim_trajectory_matches_diffusers(tiny_model):
    from diffusers import DDIMScheduler
    steps, scale = 10, 7.5
    with torch.no_grad():
        c = tiny_model.get_learned_conditioning(["photo of a sks dog", "a cat on the moon"])
        uc = tiny_model.get_learned_conditioning(["", ""])
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    sampler = DDIMSampler(tiny_model)
    final, inter = sampler.sample(steps, 2, (4, 8, 8), conditioning=c, unconditional_conditioning=uc,
                                  unconditional_guidance_scale=scale, x_T=x_T, verbose=False, log_every_t=1)
    ours = inter["x_inter"][1:]

    # The original's selection, written as diffusers' options: "leading" spacing, offset 1, final alpha = abar_0.
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == sampler.ddim_timesteps[::-1].tolist()
    unet = diffusers_unet(tiny_model)
    x, theirs = x_T.clone(), []
    with torch.no_grad():
        for t in scheduler.timesteps:
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
            x = scheduler.step(e_u + scale * (e_c - e_u), t, x, eta=0.0).prev_sample
            theirs.append(x)
    assert len(ours) == len(theirs) == steps
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) < 1e-4
    assert rel_err(final, theirs[-1]) < 1e-4


def test_plms_trajectory_matches_diffusers_pndm(tiny_model):
    """diffusers' PNDMScheduler with skip_prk_steps runs the original PLMS (Heun-like first step, then
    Adams-Bashforth on eps): the same final latent for the same start."""
    from diffusers import PNDMScheduler
    steps, scale = 10, 5.0
    with torch.no_grad():
        c = tiny_model.get_learned_conditioning(["a dog"])
        uc = tiny_model.get_learned_conditioning([""])
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours, _ = PLMSSampler(tiny_model).sample(steps, 1, (4, 8, 8), conditioning=c, unconditional_conditioning=uc,
                                             unconditional_guidance_scale=scale, x_T=x_T, verbose=False)
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1)
    scheduler.set_timesteps(steps)
    unet, x = diffusers_unet(tiny_model), x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
            x = scheduler.step(e_u + scale * (e_c - e_u), t, x).prev_sample
    assert rel_err(ours, x) < 1e-4
