"""Euler and DPM++ 2M Karras against diffusers' EulerDiscreteScheduler and DPMSolverMultistepScheduler: the sigma
schedules and UNet timesteps, guided trajectories step by step (diffusers' UNet holding the same weights, converted
by diffusers' own converter), img2img's start in diffusers' convention, and the inpainting hook in closed form."""
from types import SimpleNamespace

import pytest
import torch

from conftest import diffusers_unet, rel_err
from ldm.models.diffusion.ddim import DDIMSampler, guided_eps
from ldm.sampling.k_samplers import DPMPP2MSampler, EulerSampler
from ldm.sampling.k_schedules import img2img_start_step, init_noise_sigma
from ldm.sampling.samplers import make_sampler

BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
STEP_COUNTS = [1, 2, 10, 25, 50]


def euler_scheduler():
    """SDXL's scheduler config (stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json)."""
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler(**BETAS, timestep_spacing="leading", steps_offset=1, prediction_type="epsilon",
                                  interpolation_type="linear", use_karras_sigmas=False)


def dpmpp_scheduler():
    """DPM++ 2M Karras: the defaults (dpmsolver++, order 2, midpoint, lower_order_final, final sigma 0)."""
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(**BETAS, use_karras_sigmas=True)


CASES = {"euler": (EulerSampler, euler_scheduler), "dpmpp_2m": (DPMPP2MSampler, dpmpp_scheduler)}


# ---- schedules --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_sigmas_and_timesteps_equal_diffusers(name, steps, tiny_model):
    sampler_cls, make_scheduler = CASES[name]
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    # From diffusers' own alphas_cumprod: the same sigmas to float32 rounding.
    sigmas = sampler_cls(SimpleNamespace(alphas_cumprod=scheduler.alphas_cumprod)).make_schedule(steps)
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=1e-6, atol=0)
    # From the model's buffer (computed in float64, stored as float32): the same timesteps for the UNet.
    sampler = sampler_cls(tiny_model)
    sigmas = sampler.make_schedule(steps)
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=1e-5, atol=0)
    assert sampler.denoiser.timesteps(sigmas[:-1]).tolist() == scheduler.timesteps.double().tolist()
    if name == "euler":  # DPM-Solver starts from unit noise in its own (VP) form: see the trajectory test
        assert init_noise_sigma(sigmas) == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-5)


def test_model_schedule_is_diffusers_scaled_linear(tiny_model):
    torch.testing.assert_close(tiny_model.alphas_cumprod, euler_scheduler().alphas_cumprod, rtol=1e-5, atol=0)


# ---- guided trajectories ----------------------------------------------------------------------------------------
def prompts(model, n=2):
    with torch.no_grad():
        return (model.get_learned_conditioning(["photo of a sks dog", "a cat on the moon"][:n]),
                model.get_learned_conditioning([""] * n))


def diffusers_loop(scheduler, unet, latents, c, uc, scale, begin=0):
    """diffusers' pipeline loop: scale_model_input, UNet on [uc, c], guidance, scheduler.step. Returns every
    step's latent (in the scheduler's own form)."""
    out = []
    if begin:
        scheduler.set_begin_index(begin)
    with torch.no_grad():
        for t in scheduler.timesteps[begin:]:
            x_in = scheduler.scale_model_input(latents, t)
            e_u, e_c = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
            latents = scheduler.step(e_u + scale * (e_c - e_u), t, latents).prev_sample
            out.append(latents)
    return out


def to_scheduler_form(name, x, sigma):
    """Our k-diffusion-form latent as diffusers holds it: DPM-Solver keeps x / sqrt(sigma^2 + 1)."""
    return x / (float(sigma) ** 2 + 1) ** 0.5 if name == "dpmpp_2m" else x


@pytest.fixture(scope="module")
def unet(tiny_model):
    return diffusers_unet(tiny_model)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("steps", [10, 25])
def test_guided_trajectory_matches_diffusers(name, steps, tiny_model, unet):
    sampler_cls, make_scheduler = CASES[name]
    scale = 7.5
    c, uc = prompts(tiny_model)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    final, inter = sampler_cls(tiny_model).sample(
        steps, 2, (4, 8, 8), conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=scale,
        x_T=x_T, verbose=False, log_every_t=1, disable_progress=True)

    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    theirs = diffusers_loop(scheduler, unet, x_T * scheduler.init_noise_sigma, c, uc, scale)
    ours = inter["x_inter"][1:]
    assert len(ours) == len(theirs) == steps
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert rel_err(to_scheduler_form(name, a, scheduler.sigmas[i + 1]), b) < 1e-4, f"step {i}"
    assert rel_err(final, theirs[-1]) < 1e-4


# ---- starting part-way (img2img, inpainting) --------------------------------------------------------------------
@pytest.mark.parametrize("steps, strength, start", [(50, 0.8, 10), (10, 0.75, 3), (25, 1.0, 0), (10, 0.3, 7),
                                                     (30, 0.5, 15), (4, 0.99, 1)])
def test_img2img_start_in_diffusers_convention(steps, strength, start):
    # diffusers' get_timesteps: init_timestep = min(int(S * strength), S), t_start = S - init_timestep.
    assert img2img_start_step(steps, strength) == start


@pytest.mark.parametrize("steps, strength", [(10, 0.05), (10, 0.0), (10, 1.5), (10, -0.1)])
def test_img2img_strength_without_steps_or_out_of_range(steps, strength):
    with pytest.raises(ValueError, match="strength"):
        img2img_start_step(steps, strength)


@pytest.mark.parametrize("name", CASES)
def test_img2img_noise_level_equals_diffusers_add_noise(name, tiny_model):
    sampler_cls, make_scheduler = CASES[name]
    steps, strength = 25, 0.6
    start, sigma = sampler_cls(tiny_model).start_sigma(steps, strength)
    assert start == 10
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    theirs = scheduler.add_noise(x0, noise, scheduler.timesteps[start:start + 1])
    assert rel_err(to_scheduler_form(name, x0 + sigma * noise, sigma), theirs) < 1e-5


@pytest.mark.parametrize("name", CASES)
def test_img2img_trajectory_matches_diffusers(name, tiny_model, unet):
    """Part-way start: diffusers slices the timesteps and sets the begin index; DPM-Solver's history starts empty."""
    sampler_cls, make_scheduler = CASES[name]
    steps, strength, scale = 10, 0.6, 5.0
    c, uc = prompts(tiny_model, 1)
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    sampler = sampler_cls(tiny_model)
    start, sigma = sampler.start_sigma(steps, strength)
    ours, inter = sampler.denoise_from(x0 + sigma * noise, steps, start, c, scale, uc, log_every_t=1,
                                       disable_progress=True)

    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    latents = scheduler.add_noise(x0, noise, scheduler.timesteps[start:start + 1])
    theirs = diffusers_loop(scheduler, unet, latents, c, uc, scale, begin=start)
    assert len(theirs) == len(inter["x_inter"]) - 1 == steps - start == 6
    assert rel_err(ours, theirs[-1]) < 1e-4


@pytest.mark.parametrize("name", CASES)
def test_step_callback_can_replace_the_latent(name, tiny_model):
    """Inpainting's use: after each step paste the known region, noised to sigma_next. The last step lands on
    sigma 0, so the known region of the result is the known latent exactly."""
    sampler_cls, _ = CASES[name]
    steps, start = 8, 3
    g = torch.Generator().manual_seed(5)
    known, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    seen = []

    def paste(i, x, sigma_next):
        seen.append((i, sigma_next))
        return x * (1 - mask) + (known + sigma_next * noise) * mask

    sampler = sampler_cls(tiny_model)
    sigmas = sampler.make_schedule(steps)
    x = known + float(sigmas[start]) * torch.randn(1, 4, 8, 8, generator=g)
    c, uc = prompts(tiny_model, 1)
    out, _ = sampler.denoise_from(x, steps, start, c, 3.0, uc, callback=paste, disable_progress=True)
    assert [i for i, _ in seen] == list(range(start, steps))
    assert [s for _, s in seen] == sigmas[start + 1:].tolist()
    assert torch.equal(out * mask, known * mask)
    free, _ = sampler.denoise_from(x, steps, start, c, 3.0, uc, disable_progress=True)
    assert not torch.allclose(free * mask, known * mask, atol=1e-3)


# ---- guidance with dict conditioning, interface ----------------------------------------------------------------
class DictCondModel:
    """An eps model whose output depends on every tensor of an SDXL-like conditioning dict."""
    alphas_cumprod = None

    def apply_model(self, x, t, cond):
        ctx, y = cond["c_crossattn"][0], cond["y"]
        return x * y[:, :1, None, None] + ctx.mean(dim=(1, 2))[:, None, None, None] + t[:, None, None, None]


def test_guided_eps_batches_dict_conditioning():
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 5])
    c = {"c_crossattn": [torch.randn(2, 7, 32, generator=g)], "y": torch.randn(2, 16, generator=g)}
    uc = {"c_crossattn": [torch.randn(2, 7, 32, generator=g)], "y": torch.randn(2, 16, generator=g)}
    model = DictCondModel()
    e_u, e_c = model.apply_model(x, t, uc), model.apply_model(x, t, c)
    torch.testing.assert_close(guided_eps(model, x, t, c, uc, 4.0), e_u + 4.0 * (e_c - e_u))
    with pytest.raises(ValueError, match="keys differ"):
        guided_eps(model, x, t, c, {"c_crossattn": uc["c_crossattn"]}, 4.0)


def test_crossattn_dict_conditioning_samples_as_the_tensor(tiny_model):
    c, uc = prompts(tiny_model, 1)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    kw = dict(unconditional_guidance_scale=5.0, x_T=x_T, verbose=False, disable_progress=True)
    plain, _ = DPMPP2MSampler(tiny_model).sample(4, 1, (4, 8, 8), conditioning=c, unconditional_conditioning=uc, **kw)
    as_dict, _ = DPMPP2MSampler(tiny_model).sample(4, 1, (4, 8, 8), conditioning={"c_crossattn": [c]},
                                                   unconditional_conditioning={"c_crossattn": [uc]}, **kw)
    torch.testing.assert_close(as_dict, plain, rtol=0, atol=0)


def test_generator_draws_the_start_noise(tiny_model):
    c, _ = prompts(tiny_model, 1)
    drawn, _ = EulerSampler(tiny_model).sample(3, 1, (4, 8, 8), conditioning=c, verbose=False,
                                               generator=torch.Generator().manual_seed(8), disable_progress=True)
    given, _ = EulerSampler(tiny_model).sample(3, 1, (4, 8, 8), conditioning=c, verbose=False, disable_progress=True,
                                               x_T=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8)))
    assert torch.equal(drawn, given)


@pytest.mark.parametrize("option", [dict(eta=0.5), dict(eta=1.0), dict(temperature=0.9), dict(mask=torch.ones(1))])
def test_unsupported_options_raise(option, tiny_model):
    with pytest.raises(NotImplementedError, match="unsupported options"):
        EulerSampler(tiny_model).sample(2, 1, (4, 8, 8), verbose=False, **option)


def test_registry(tiny_model):
    assert isinstance(make_sampler("dpmpp_2m", tiny_model), DPMPP2MSampler)
    assert isinstance(make_sampler("ddim", tiny_model), DDIMSampler)
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        make_sampler("heun", tiny_model)
    with pytest.raises(ValueError, match="sampler 'flow_euler' cannot sample this model .*use ddim, plms"):
        make_sampler("flow_euler", tiny_model)  # an eps model: the flow sampler would integrate the wrong ODE
