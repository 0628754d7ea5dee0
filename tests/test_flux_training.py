"""DreamBooth on FLUX.1 through main.py, on the tiny FLUX model: the flow objective against its definition, the
timestep densities against their closed forms, LoRA and full fine-tuning runs that resume, the memory engine
(frozen weights in bf16 or float8, block swap) changing memory and not the loss, and the LoRA files read by
diffusers' FluxPipeline.load_lora_weights to the same prediction."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

import main as main_module
from conftest import REPO, randomize_, rel_err
from helpers import make_folder

TINY_FT = REPO / "configs/flux/tiny-flux-finetune.yaml"


def train(tmp_path: Path, tokenizer: Path, *extra: str, base: Path = TINY_FT, steps: int = 4) -> Path:
    args = ["--base", str(base), "-t", "--logdir", str(tmp_path / "logs"), "-n", "flux",
            "--data_root", str(make_folder(tmp_path / "subject", 3)),
            "--reg_data_root", str(make_folder(tmp_path / "reg", 3, offset=50)), "--class_word", "toy",
            "--max_steps", str(steps), "--t5_tokenizer", str(tokenizer),
            "lightning.callbacks.image_logger.params.batch_frequency=1000", *extra]
    assert main_module.main(args) == 0
    (run,) = (tmp_path / "logs").iterdir()
    return run


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "caption": ["a sks toy", "a sks toy"],
            "reg_image": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "reg_caption": ["a toy", "a toy"]}


# ---- the objective ---------------------------------------------------------------------------------------------

def test_the_loss_is_the_velocity_regression_of_a_rectified_flow(tiny_flux_model, monkeypatch):
    """shared_step's loss equals mse(v_theta((1 - t) z + t n, t), n - z) per example (Esser et al. 2024, eq. 1 with
    the velocity target), subject plus weighted prior, recomputed here from the draws it made; FLUX.1 [dev]'s
    guidance input is train_guidance (1.0) while training."""
    model = copy.deepcopy(tiny_flux_model).train()
    model.first_stage_key, model.cond_stage_key, model.reg_weight = "image", "caption", 0.5
    seen = {}
    forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda x, t, **c: seen.update(x=x, t=t, c=c) or forward(x, t, **c))
    noised = model.objective.noised
    monkeypatch.setattr(model.objective, "noised", lambda m, z, t, n: seen.update(z=z, n=n) or noised(m, z, t, n))
    loss, logs = model.shared_step(batch(), torch.Generator().manual_seed(4))
    z, n, t = seen["z"], seen["n"], seen["t"]
    assert torch.allclose(seen["x"], (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * n)
    assert torch.equal(seen["c"]["guidance"], torch.ones(4)) and ((0 < t) & (t < 1)).all()
    with torch.no_grad():
        pred = forward(seen["x"], t, **seen["c"])
    per = ((pred - (n - z)) ** 2).mean(dim=(1, 2, 3))
    assert float(logs["loss_subject"]) == pytest.approx(float(per[:2].mean()), rel=1e-5)
    assert float(loss) == pytest.approx(float(per[:2].mean() + 0.5 * per[2:].mean()), rel=1e-5)


@pytest.mark.parametrize("sampling, latent, median", [
    ("sigmoid", 128, 0.5),                                           # sigmoid(N(0, 1)): median sigmoid(0)
    ("shift", 128, 0.75),                                            # 3 * 0.5 / (1 + 2 * 0.5)
    ("flux_shift", 128, math.exp(1.15) / (math.exp(1.15) + 1)),      # 1024 px: 4096 tokens, mu = 1.15
    ("flux_shift", 32, math.exp(0.5) / (math.exp(0.5) + 1)),         # 256 px: 256 tokens, mu = 0.5
])
def test_timestep_sampling_has_its_closed_form_median(sampling, latent, median):
    from ldm.models.diffusion.objectives import FlowObjective
    t = FlowObjective(sampling, discrete_flow_shift=3.0).sample_t(None, 200_000, (1, 16, latent, latent), "cpu",
                                                                   torch.Generator().manual_seed(0))
    assert abs(float(t.median()) - median) < 0.005 and float(t.min()) > 0 and float(t.max()) < 1


# ---- runs -------------------------------------------------------------------------------------------------------

def test_lora_run_writes_sd_scripts_names_and_resumes(tmp_path, t5_tokenizer):
    run = train(tmp_path, t5_tokenizer)
    with safe_open(str(run / "checkpoints" / "lora-last.safetensors"), "pt") as f:
        keys = set(f.keys())
    for module in ("double_blocks_1_img_attn_qkv", "double_blocks_0_txt_mlp_2", "single_blocks_1_linear1"):
        assert f"lora_unet_{module}.lora_down.weight" in keys and f"lora_unet_{module}.alpha" in keys
    assert not any("mod_lin" in k or "modulation" in k for k in keys)  # sd-scripts leaves modulation out
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert main_module.main(["-r", str(run), "--max_steps", "6"]) == 0
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.lora_B.dreambooth.weight"
    assert not torch.equal(first["state_dict"][key], resumed["state_dict"][key])


def test_full_fine_tune_trains_the_transformer(tmp_path, t5_tokenizer):
    config = OmegaConf.load(TINY_FT)
    del config.model.params.lora_config
    base = tmp_path / "full.yaml"
    OmegaConf.save(config, base)
    run = train(tmp_path, t5_tokenizer, base=base, steps=3)
    sd = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert sd["global_step"] == 3 and not any("lora" in k for k in sd["state_dict"])
    assert len(sd["optimizer_states"][0]["state"]) == len([k for k in sd["state_dict"]
                                                            if k.startswith("model.diffusion_model.")])


# ---- the memory engine ----------------------------------------------------------------------------------------

def lean_copy(model, frozen_dtype: str):
    from ldm.modules.lowmem import quantize_fp8_
    from ldm.weights.lora import LoraSettings, add_lora
    copy_ = copy.deepcopy(model)  # as LatentDiffusion(frozen_dtype=...) and the training module build it:
    copy_.first_stage_key, copy_.cond_stage_key = "image", "caption"
    copy_.lora_settings = LoraSettings(rank=4, unet_targets=("img_attn.qkv", "linear1"))
    copy_.frozen_dtype = frozen_dtype
    if frozen_dtype != "fp32":
        for part in copy_.frozen_parts():  # frozen parts in bf16 before the weights (here: already there)
            part.to(torch.bfloat16)
    add_lora(copy_, copy_.lora_settings)  # then the adapters, in float32
    if frozen_dtype == "fp8":
        quantize_fp8_(copy_.model.diffusion_model)  # configure_model: the frozen linear weights in float8
    return copy_.train()


def test_frozen_weights_in_bf16_or_fp8_change_memory_not_the_loss(tiny_flux_model):
    """The same step with the frozen transformer in fp32, bf16 and float8 (per-tensor scale): the weights take 4,
    2 and about 1 byte each, and the loss moves by bf16's rounding (measured: < 1 %), not more; the saved state
    dict keeps the released keys and no float8."""
    from ldm.modules.lowmem import parameters_bytes
    losses, sizes = {}, {}
    for dtype in ("fp32", "bf16", "fp8"):
        model = lean_copy(tiny_flux_model, dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != "fp32"):
            loss, _ = model.shared_step(batch(), torch.Generator().manual_seed(4))
        loss.backward()
        losses[dtype], sizes[dtype] = float(loss), parameters_bytes([model.model.diffusion_model])
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
        sd = model.state_dict()
        assert not any(v.dtype == torch.float8_e4m3fn or k.endswith("weight_scale") for k, v in sd.items())
    assert sizes["bf16"] < 0.55 * sizes["fp32"] and sizes["fp8"] < 0.65 * sizes["bf16"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.01)
    assert losses["fp8"] == pytest.approx(losses["fp32"], rel=0.03)  # e4m3 keeps 3 mantissa bits per weight


def test_block_swap_moves_each_block_in_time_and_keeps_the_gradients(tiny_flux_model):
    """With 3 of the 4 blocks swapped (a recording transfer stands in for the host-to-GPU copy), a checkpointed
    forward and backward give the gradients of the plain run; every swapped block is on the device whenever it
    runs, at most two at a time (the running one and the one fetched ahead), and none after the step."""
    from ldm.modules.lowmem import BlockSwap, _tensors
    net = copy.deepcopy(tiny_flux_model.model.diffusion_model)
    net.params.use_checkpoint = True
    net.final_layer.requires_grad_(True)
    for p in [*net.double_blocks.parameters(), *net.single_blocks.parameters()]:
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, ctx, y = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g)

    def step() -> torch.Tensor:
        net.zero_grad()
        net.velocity(x, torch.tensor([0.3, 0.8]), ctx, y, 3.5).square().mean().backward()
        return net.final_layer.linear.weight.grad.clone()

    plain = step()
    blocks = [*net.double_blocks, *net.single_blocks]
    ids = {id(t): k for k, b in enumerate(blocks) for t in _tensors(b)}
    log, marks = [], set()

    def transfer(tensor, device):
        copied = tensor.clone()
        marks.add(id(copied))
        return copied
    swap = BlockSwap(blocks, resident=1, device="cpu", checkpointed=True, transfer=transfer)
    for k, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda b, a, k=k: log.append((k, sorted(swap.on_device))))
    swapped = step()
    assert torch.allclose(plain, swapped)
    assert all(k in on or k not in swap.swapped for k, on in log) and max(len(on) for _, on in log) <= 2
    assert [k for k, _ in log] == [0, 1, 2, 3, 3, 2, 1, 0]  # forward, then every checkpointed recomputation in reverse
    assert not swap.on_device and ids  # everything released after the step


# ---- the LoRA files in diffusers -------------------------------------------------------------------------------

def test_lora_file_predicts_in_diffusers_what_it_predicts_here(t5_tokenizer, tmp_path):
    """A LoRA file in sd-scripts' FLUX layout, on every projection sd-scripts trains (single blocks' linear1
    included, whose split diffusers' converter makes at FLUX's real width: hence a model 3072 wide, one block of
    each kind), loaded by diffusers' FluxPipeline.load_lora_weights, predicts what our model with the same adapters
    predicts."""
    from conftest import tiny_flux_config
    from ldm.export.diffusers import export_diffusers
    from ldm.util import instantiate_from_config
    from ldm.weights.checkpoint import save_checkpoint
    from ldm.weights.lora import LoraSettings, add_lora, lora_state_dict
    config = tiny_flux_config(t5_tokenizer)
    net = config.model.params.unet_config.params
    net.hidden_size, net.num_heads, net.axes_dim, net.depth, net.depth_single_blocks = 3072, 24, [16, 56, 56], 1, 1
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    randomize_(model, seed=1, std=0.02)
    model.eval()
    ckpt = save_checkpoint(tmp_path / "wide.safetensors", model.state_dict())
    config_path = tmp_path / "wide.yaml"
    OmegaConf.save(config, config_path)
    folder = export_diffusers(OmegaConf.load(config_path), ckpt, tmp_path / "wide-diffusers", verbose=False)
    targets = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
               "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")
    add_lora(model, LoraSettings(rank=4, alpha=2, unet_targets=targets))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn_like(p) * 0.02  # peft starts B at zero: give the adapters an effect
    lora = save_checkpoint(tmp_path / "lora.safetensors", lora_state_dict(model))
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.load_lora_weights(str(lora))
    g = torch.Generator().manual_seed(2)
    x, ctx, y = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 6, 32, generator=g), torch.randn(1, 32, generator=g)
    t = torch.tensor([0.6])
    with torch.no_grad():
        ours = model.model.diffusion_model.velocity(x, t, ctx, y, 3.5)
        from ldm.families.flux.modules.transformer import image_ids, pack, text_ids, unpack
        theirs = pipe.transformer(hidden_states=pack(x), timestep=t, guidance=torch.tensor([3.5]),
                                  pooled_projections=y, encoder_hidden_states=ctx, txt_ids=text_ids(1, 6)[0],
                                  img_ids=image_ids(1, 8, 8)[0], return_dict=False)[0]
    assert rel_err(unpack(theirs, 8, 8), ours) < 1e-4
    pipe.unload_lora_weights()
    with torch.no_grad():
        plain = pipe.transformer(hidden_states=pack(x), timestep=t, guidance=torch.tensor([3.5]), pooled_projections=y,
                                 encoder_hidden_states=ctx, txt_ids=text_ids(1, 6)[0], img_ids=image_ids(1, 8, 8)[0],
                                 return_dict=False)[0]
    assert rel_err(unpack(plain, 8, 8), ours) > 1e-3  # the adapters changed the prediction


def test_subjects_buckets_masks_and_validation_run_on_flux(tmp_path, t5_tokenizer):
    """What the SD families have and FLUX shares through the same parts: two subjects with their class images
    generated by the starting model (flow sampler, guidance input), aspect-ratio buckets, a masked loss, and
    validation with the paper's metrics choosing a step."""
    import json

    import yaml
    from PIL import Image

    from eval_helpers import make_clip_folder, make_dino_folder
    clip, dino = make_clip_folder(tmp_path / "clip"), make_dino_folder(tmp_path / "dino")
    for name, offset in (("dog", 0), ("cat", 20)):
        folder = make_folder(tmp_path / name, 2, offset=offset)
        for photo in folder.glob("*.png"):
            mask = Image.new("L", (96, 96), 0)
            mask.paste(255, (20, 20, 70, 70))
            mask.save(photo.with_name(photo.stem + ".mask.png"))
    concepts = [{"data_root": "dog", "token": "sks", "class_word": "dog", "reg_data_root": "dogs",
                 "num_class_images": 2},
                {"data_root": "cat", "token": "zwx", "class_word": "cat", "reg_data_root": "cats",
                 "num_class_images": 2}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(concepts))
    args = ["--base", str(TINY_FT), "-t", "--logdir", str(tmp_path / "logs"), "-n", "flux", "--concepts",
            str(tmp_path / "c.yaml"), "--max_steps", "4", "--t5_tokenizer", str(t5_tokenizer),
            "data.params.buckets=true", "data.params.masked_loss=true", "class_images.ddim_steps=2",
            "lightning.callbacks.image_logger.params.batch_frequency=1000", "lightning.validation.every_n_steps=2",
            "lightning.validation.num_images=1", "lightning.validation.ddim_steps=2", "lightning.validation.scale=3.5",
            f"lightning.validation.clip={clip}", f"lightning.validation.dino={dino}",
            "lightning.validation.pres_margin=1.0", "lightning.trainer.log_every_n_steps=1"]
    assert main_module.main(args) == 0
    (run,) = (tmp_path / "logs").iterdir()
    assert len(list((tmp_path / "dogs").glob("*.png"))) == 2 and len(list((tmp_path / "cats").glob("*.png"))) == 2
    history = json.loads((run / "validation.json").read_text())
    assert [h["step"] for h in history] == [0, 2, 4] and all(h["CLIP-I"] is not None for h in history)
    assert all(math.isfinite(h["loss_subject_fixed"]) for h in history)
    assert (run / "metrics.md").is_file() and (run / "images" / "val" / "step-000004.png").is_file()
    assert "train/loss_subject_unmasked" in (run / "csv" / "metrics.csv").read_text()  # the masked loss ran
