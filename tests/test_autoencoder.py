"""AutoencoderKL against the SD v1 checkpoint layout, against diffusers' independent VAE, and the Gaussian
posterior against closed forms."""
from __future__ import annotations

import math

import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

PREFIX = "first_stage_model."

V1_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)
# configs/stable-diffusion/tiny-inference.yaml
TINY_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32,
    ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
)
IDENTITY_LOSS = {"target": "torch.nn.Identity"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_state_dict_matches_sd_v1_layout() -> None:
    from conftest import reference_layout
    expected = {k[len(PREFIX):]: (list(shape), dtype) for k, (shape, dtype) in reference_layout().items()
                if k.startswith(PREFIX)}
    assert len(expected) == 248  # the count the reference README gives

    with torch.device("meta"):
        model = AutoencoderKL(ddconfig=V1_DDCONFIG, lossconfig=IDENTITY_LOSS, embed_dim=4)
    ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}

    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


def _randomized_tiny_model() -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(ddconfig=TINY_DDCONFIG, lossconfig=IDENTITY_LOSS, embed_dim=4).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # GroupNorm starts at weight 1 / bias 0, which would hide a skipped or swapped affine; give every
            # norm, bias and weight its own seeded noise so each parameter changes the output.
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.add_(0.01 * torch.randn_like(p))
    return model


def test_matches_diffusers_autoencoder() -> None:
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = _randomized_tiny_model()
    config = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
        layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64,
    )
    theirs = diffusers.AutoencoderKL(**config).eval()
    # The converter expects the full-checkpoint prefix and turns the 1x1-conv attention weights into
    # linear ones (its conv_attn_to_linear step).
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(checkpoint, config)
    theirs.load_state_dict(converted, strict=True)

    gen = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 64, 64, generator=gen)
    latent = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        posterior = ours.encode(image)
        reference = theirs.encode(image).latent_dist
        decoded = ours.decode(latent)
        decoded_ref = theirs.decode(latent).sample

    assert posterior.mean.shape == (1, 4, 8, 8)
    assert decoded.shape == (1, 3, 64, 64)
    assert rel_err(posterior.mean, reference.mean) < 1e-4
    assert rel_err(posterior.logvar, reference.logvar) < 1e-4
    assert rel_err(decoded, decoded_ref) < 1e-4


def _posterior(mu: torch.Tensor, logvar: torch.Tensor, **kw) -> DiagonalGaussianDistribution:
    return DiagonalGaussianDistribution(torch.cat([mu, logvar], dim=1), **kw)


def test_gaussian_kl_nll_mode_closed_form() -> None:
    gen = torch.Generator().manual_seed(2)
    mu = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    logvar = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    dist = _posterior(mu, logvar)

    # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2, per element, summed per sample.
    sigma = torch.exp(0.5 * logvar)
    kl_by_hand = (-torch.log(sigma) + (sigma**2 + mu**2) / 2 - 0.5).sum(dim=(1, 2, 3))
    torch.testing.assert_close(dist.kl(), kl_by_hand)
    # Against a second Gaussian: KL(p || q) = log(s2/s1) + (s1^2 + (m1-m2)^2) / (2 s2^2) - 1/2.
    mu2, logvar2 = 0.5 * mu.flip(0), 0.3 * logvar.flip(0)
    sigma2 = torch.exp(0.5 * logvar2)
    kl_pq = (torch.log(sigma2 / sigma) + (sigma**2 + (mu - mu2) ** 2) / (2 * sigma2**2) - 0.5).sum(dim=(1, 2, 3))
    torch.testing.assert_close(dist.kl(_posterior(mu2, logvar2)), kl_pq)

    x = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    log_density = -0.5 * math.log(2 * math.pi) - torch.log(sigma) - (x - mu) ** 2 / (2 * sigma**2)
    torch.testing.assert_close(dist.nll(x), -log_density.sum(dim=(1, 2, 3)))

    assert torch.equal(dist.mode(), mu)
    # The clamp of the original: logvar outside [-30, 20] is cut.
    clamped = _posterior(torch.zeros(1, 1, 1, 1), torch.tensor([[[[50.0]]]]))
    assert clamped.logvar.item() == 20.0

    frozen = _posterior(mu, logvar, deterministic=True)
    assert torch.equal(frozen.sample(), mu)
    assert torch.equal(frozen.kl(), torch.zeros(2, dtype=torch.float64))


def test_gaussian_sample_statistics_and_generator() -> None:
    mu = torch.tensor([1.5, -2.0]).reshape(1, 2, 1, 1).expand(20000, 2, 1, 1)
    logvar = torch.log(torch.tensor([0.25, 4.0])).reshape(1, 2, 1, 1).expand(20000, 2, 1, 1)
    dist = _posterior(mu, logvar)

    draws = dist.sample(generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(draws.mean(dim=0).flatten(), torch.tensor([1.5, -2.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(draws.std(dim=0).flatten(), torch.tensor([0.5, 2.0]), atol=0.05, rtol=0)

    again = dist.sample(generator=torch.Generator().manual_seed(3))
    assert torch.equal(draws, again)
    assert draws.dtype == mu.dtype and draws.device == mu.device
