"""scripts/prune_ckpt.py: a Lightning-style training save pruned to the inference keys, EMA selection, half
precision, the pruned files sampled by scripts/stable_txt2img.py, the size report, and one-line errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIG, load_config, load_script
from ldm.export.prune import prune_state_dict
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS
from ldm.util import instantiate_from_config
from ldm.weights.checkpoint import CheckpointError, ema_key, read_checkpoint
from ldm.weights.load import load_model_from_config



prune_ckpt = load_script("prune_ckpt")
txt2img = load_script("stable_txt2img")
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def inference_keys():
    """The keys of a fresh sampling model (``use_ema: False``): what a pruned file must hold, no more."""
    config = load_config()
    config.model.params.use_ema = False
    with torch.device("meta"):
        return set(instantiate_from_config(config.model).state_dict())


@pytest.fixture(scope="module")
def training_ckpt(tiny_model, tmp_path_factory):
    """What Lightning's ``Trainer.save_checkpoint`` writes for a run with EMA: the model, its EMA copy (made to
    differ from the live weights), and optimizer / scheduler / callback / loop states."""
    sd = dict(tiny_model.state_dict())
    gen = torch.Generator().manual_seed(5)
    for k in [k for k in sd if k.startswith(UNET)]:
        sd[ema_key(k)] = sd[k] + 0.01 * torch.randn(sd[k].shape, generator=gen)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(42, dtype=torch.int32)
    moments = {i: {"step": torch.tensor(42.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.ones(3)}
               for i in range(4)}
    obj = {
        "epoch": 3, "global_step": 42, "pytorch-lightning_version": "2.4.0", "state_dict": sd,
        "optimizer_states": [{"state": moments, "param_groups": [{"lr": 1e-6, "betas": (0.9, 0.999),
                                                                   "params": [0, 1, 2, 3]}]}],
        "lr_schedulers": [{"base_lrs": [1e-6], "last_epoch": 42}],
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": "", "best_model_score": None}},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
    }
    path = tmp_path_factory.mktemp("train") / "last.ckpt"
    torch.save(obj, path)
    return path


def prune(*argv):
    return prune_ckpt.main([str(a) for a in argv])


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_training_save_pruned_to_exactly_the_inference_keys_in_fp16(training_ckpt, inference_keys, tmp_path,
                                                                     suffix, capsys):
    out = prune(training_ckpt, tmp_path / f"pruned{suffix}", "--fp16")
    assert "EMA weights" in capsys.readouterr().out  # the default with a full-EMA file, and it says so
    sd, meta = read_checkpoint(out)
    assert set(sd) == inference_keys
    assert meta["global_step"] == 42
    for k, v in sd.items():
        expected = torch.float32 if k in SCHEDULE_BUFFERS else torch.int64 if k == POSITION_IDS else torch.float16
        assert v.dtype == expected, k
    assert torch.equal(sd[POSITION_IDS], torch.arange(77)[None])
    if suffix == ".ckpt":  # the plain {state_dict, global_step} layout every SD v1 tool reads
        assert set(torch.load(out, weights_only=True)) == {"state_dict", "global_step"}


def test_ema_selection(training_ckpt, tiny_model, tmp_path):
    original, _ = read_checkpoint(training_ckpt)
    key = UNET + "input_blocks.0.0.weight"
    ema = prune(training_ckpt, tmp_path / "ema.ckpt", "--ema")
    live = prune(training_ckpt, tmp_path / "live.ckpt", "--no-ema", "--safetensors")
    assert live.name == "live.safetensors"
    assert torch.equal(read_checkpoint(ema)[0][key], original[ema_key(key)])
    assert torch.equal(read_checkpoint(live)[0][key], original[key])
    assert not torch.equal(original[key], original[ema_key(key)])
    # The VAE and text encoder have no EMA: the same either way.
    vae = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(read_checkpoint(ema)[0][vae], original[vae])
    # The pure function, with bfloat16.
    pruned, used = prune_state_dict(tiny_model.state_dict(), dtype=torch.bfloat16)
    assert not used and pruned[key].dtype == torch.bfloat16 and pruned["betas"].dtype == torch.float32


def _sample(ckpt, outdir):
    args = ["--config", str(TINY_CONFIG), "--ckpt", str(ckpt), "--outdir", str(outdir), "--H", "64", "--W", "64",
            "--ddim_steps", "4", "--n_samples", "2", "--n_iter", "1", "--scale", "5", "--seed", "3",
            "--prompt", "photo of a sks dog", "--skip_grid"]
    return txt2img.main(args)


def test_pruned_files_sample_like_the_training_save(training_ckpt, tmp_path):
    reference = _sample(training_ckpt, tmp_path / "ref")
    # Same file name (the PNGs record it), so an fp32 prune must give the very same bytes.
    fp32 = _sample(prune(training_ckpt, tmp_path / "fp32" / training_ckpt.name), tmp_path / "out32")
    fp16 = _sample(prune(training_ckpt, tmp_path / "pruned-fp16.safetensors", "--fp16"), tmp_path / "out16")
    for a, b, c in zip(reference, fp32, fp16):
        assert a.read_bytes() == b.read_bytes()
        ref, half = (np.asarray(Image.open(p), dtype=np.float64) for p in (a, c))
        assert np.abs(ref - half).mean() < 2 and np.abs(ref - half).max() <= 8  # 8-bit levels
        assert ref.std() > 1.0  # not blank images that would match trivially


def test_file_with_every_float_halved_still_loads(tiny_model, tmp_path):
    """Community fp16 prunes also halved the schedule buffers: the loader casts them back to the model's dtype."""
    from ldm.weights.checkpoint import save_checkpoint
    sd = {k: v.half() if v.is_floating_point() else v for k, v in tiny_model.state_dict().items()}
    model = load_model_from_config(load_config(), save_checkpoint(tmp_path / "all-half.ckpt", sd), verbose=False)
    assert model.alphas_cumprod.dtype == torch.float32
    assert torch.allclose(model.alphas_cumprod, tiny_model.alphas_cumprod, rtol=1e-3)


def test_report_equals_the_sizes_computed_by_hand(capsys):
    prune("--report")
    printed = [int(line.split("(")[-1].split(" bytes")[0].replace(",", "")) for line in
               capsys.readouterr().out.splitlines()]
    # The element counts of shared/reference/README.md: UNet, VAE, text encoder (float32), 12 x 1000 schedule
    # floats, position_ids (77 int64), and the EMA's copy of the UNet plus its two 4-byte scalars.
    unet, vae, text = 859_520_964, 83_653_863, 123_060_480
    pruned32 = (unet + vae + text + 12_000) * 4 + 77 * 8
    pruned16 = (unet + vae + text) * 2 + 12_000 * 4 + 77 * 8
    full_ema = pruned32 + unet * 4 + 4 + 4
    training = pruned32 + 2 * 4 * (unet + text)
    assert printed == [full_ema, training, pruned32, pruned16]
    assert 2.1e9 < pruned16 < 2.2e9


def _expect_error(capsys, *argv, usage=False):
    with pytest.raises(SystemExit) as e:
        prune(*argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 or usage  # argparse's own flag errors print the usage first
    assert "error: " in lines[-1]
    return lines[-1]


def test_bad_inputs_fail_with_one_line(tiny_ckpt, tiny_model, tmp_path, capsys):
    from safetensors.torch import save_file
    assert "checkpoint file not found" in _expect_error(capsys, tmp_path / "nope.ckpt", tmp_path / "o.ckpt")
    assert "is also an input" in _expect_error(capsys, tiny_ckpt, tiny_ckpt)
    assert "no full EMA weights" in _expect_error(capsys, tiny_ckpt, tmp_path / "o.ckpt", "--ema")
    diffusers_file = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(2)},
              str(diffusers_file))
    assert "diffusers model file" in _expect_error(capsys, diffusers_file, tmp_path / "o.ckpt")
    sd2 = {k.replace("cond_stage_model.transformer.", "cond_stage_model.model."): v
           for k, v in tiny_model.state_dict().items()}
    torch.save({"state_dict": sd2}, tmp_path / "sd2.ckpt")
    assert "Stable Diffusion 2" in _expect_error(capsys, tmp_path / "sd2.ckpt", tmp_path / "o.ckpt")
    not_a_ckpt = tmp_path / "notes.ckpt"
    not_a_ckpt.write_text("hello")
    assert "not a readable PyTorch checkpoint" in _expect_error(capsys, not_a_ckpt, tmp_path / "o.ckpt")
    assert "give the input and the output" in _expect_error(capsys, tiny_ckpt, usage=True)
    assert "not allowed with" in _expect_error(capsys, tiny_ckpt, tmp_path / "o.ckpt", "--fp16", "--bf16", usage=True)
    assert not (tmp_path / "o.ckpt").exists()
    with pytest.raises(CheckpointError, match="^.*no UNet"):
        prune_state_dict({k: v for k, v in tiny_model.state_dict().items() if not k.startswith(UNET)})
