"""FLUX.1 as the scripts meet it: the released parts as separate files (transformer in Black Forest Labs' names,
ae, T5 with either tied name, CLIP), assembled by the one loader and sampled by stable_txt2img.py, img2img.py and
inpaint.py on the tiny model; and every mistake a user makes with those files as one line before a model loads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from conftest import TINY_CONFIG, TINY_FLUX_CONFIG, load_script

T5 = "conditioner.embedders.1.transformer."
CLIP = "conditioner.embedders.0.transformer."


def save_part(sd: dict, prefix: str, path: Path, drop: tuple[str, ...] = ()) -> Path:
    save_file({k[len(prefix):]: v.contiguous() for k, v in sd.items() if k.startswith(prefix)
               and not k[len(prefix):].startswith(drop)}, str(path))
    return path


@pytest.fixture(scope="module")
def parts(tiny_flux_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny model saved the way FLUX.1 is released: four files, the transformer without a prefix, T5 with only
    ``shared.weight`` (as some releases hold it), CLIP without ``position_ids`` (as transformers now saves it)."""
    folder = tmp_path_factory.mktemp("flux-parts")
    sd = tiny_flux_model.state_dict()
    return {"ckpt": save_part(sd, "model.diffusion_model.", folder / "flux1-tiny.safetensors"),
            "ae": save_part(sd, "first_stage_model.", folder / "ae.safetensors"),
            "t5": save_part(sd, T5, folder / "t5.safetensors", drop=("encoder.embed_tokens.",)),
            "clip": save_part(sd, CLIP, folder / "clip_l.safetensors", drop=("text_model.embeddings.position_ids",))}


def flags(parts: dict[str, Path], tokenizer: Path, out: Path, *extra: str, config: Path = TINY_FLUX_CONFIG,
          without: tuple[str, ...] = ()) -> list[str]:
    files = [f for name in ("ae", "t5", "clip") if name not in without for f in (f"--{name}", str(parts[name]))]
    return ["--config", str(config), "--ckpt", str(parts["ckpt"]), *files, "--t5_tokenizer", str(tokenizer),
            "--outdir", str(out), "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--seed", "3",
            "--prompt", "photo of a sks dog", *extra]


def test_the_released_files_sample_like_the_model_in_memory(tiny_flux_model, parts, t5_tokenizer, tmp_path):
    """The four files assembled by the loader give the pictures the model in memory gives (2 flow-Euler steps,
    the distilled guidance 3.5 by default, no unconditional pass), and the PNG says so."""
    txt2img = load_script("stable_txt2img").main
    (path, _grid) = txt2img(flags(parts, t5_tokenizer, tmp_path / "out"))
    meta = Image.open(path).text
    assert (meta["sampler"], meta["guidance"], meta["scale"], meta["steps"]) == ("flow_euler", "3.5", "1.0", "2")
    from ldm.sampling.samplers import make_sampler
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 16, 8, 8, generator=g)
    sampler = make_sampler("flow_euler", tiny_flux_model)
    c = tiny_flux_model.with_guidance(tiny_flux_model.get_learned_conditioning(["photo of a sks dog"]), 3.5)
    with torch.no_grad():
        z, _ = sampler.sample(2, 1, (16, 8, 8), conditioning=c, x_T=noise, verbose=False)
        expected = ((tiny_flux_model.decode_first_stage(z)[0].clamp(-1, 1) + 1) * 127.5).round()
    got = torch.from_numpy(np.asarray(Image.open(path))).permute(2, 0, 1).float()
    assert (got - expected).abs().max() <= 1  # the PNG rounds; the same weights and noise give the same picture


def test_img2img_and_inpaint_take_the_same_files(parts, t5_tokenizer, tmp_path):
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (30, 140, 200)).save(picture)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    m.save(mask)
    (i2i, _) = load_script("img2img").main(flags(parts, t5_tokenizer, tmp_path / "i2i", "--init-img", str(picture),
                                                 "--strength", "0.5", "--ddim_steps", "4"))
    assert Image.open(i2i).text["strength"] == "0.5"
    (inp, _) = load_script("inpaint").main(flags(parts, t5_tokenizer, tmp_path / "inp", "--image", str(picture),
                                                 "--mask", str(mask), "--mask_blur", "0"))
    out = np.asarray(Image.open(inp)).astype(int)
    assert (out[:8, :8] == (30, 140, 200)).all()  # far from the mask: the input's pixels, bit for bit


def one_line(capsys, entry, argv) -> str:
    with pytest.raises(SystemExit) as info:
        entry(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Sampler" not in line]
    assert info.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("case, needle", [
    ("no_t5", "FLUX.1 [dev] needs its other files: --t5 (the checkpoint holds no conditioner.embedders.1.transformer.*"),
    ("sd_config", "--ae: Stable Diffusion v1 has no such part"),
    ("tokenizer_missing", "--t5_tokenizer: T5 tokenizer file"),
    ("tokenizer_not_spm", "is not a SentencePiece model"),
    ("schnell_with_guidance", "--guidance 2.0: FLUX.1 [schnell] has no guidance input"),
    ("sd_sampler", "--sampler ddim: FLUX.1 [dev] is a rectified flow; it samples with flow_euler"),
    ("flux_file_for_sd", "it is a FLUX.1 [dev] checkpoint, but the config builds another model (use --config "
                         "configs/flux/flux1-dev-inference.yaml)"),
    ("full_size_config", "it is a FLUX.1 [dev] checkpoint, but of another size than the config builds"),
    ("sd_file_for_flux", "it is a Stable Diffusion v1 checkpoint, but the config builds FLUX.1 [dev] (use --config "
                         "configs/stable-diffusion/v1-inference.yaml)"),
])
def test_each_mistake_is_one_line(parts, t5_tokenizer, tiny_ckpt, tmp_path, capsys, monkeypatch, case, needle):
    txt2img = load_script("stable_txt2img")
    if case not in ("no_t5", "flux_file_for_sd", "full_size_config", "sd_file_for_flux"):  # before any model
        monkeypatch.setattr(txt2img, "load_sampling_model", lambda *a: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    argv = {
        "no_t5": flags(parts, t5_tokenizer, out, without=("t5",)),
        "sd_config": flags(parts, t5_tokenizer, out, config=TINY_CONFIG),
        "tokenizer_missing": flags(parts, tmp_path / "nowhere.model", out),
        "tokenizer_not_spm": flags(parts, parts["ae"], out),
        "schnell_with_guidance": flags(parts, t5_tokenizer, out, "--guidance", "2", config=schnell(tmp_path)),
        "sd_sampler": flags(parts, t5_tokenizer, out, "--sampler", "ddim"),
        "flux_file_for_sd": ["--config", str(TINY_CONFIG), "--ckpt", str(parts["ckpt"]), "--outdir", str(out),
                             "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1"],
        "full_size_config": flags(parts, t5_tokenizer, out, config=Path("configs/flux/flux1-dev-inference.yaml")),
        "sd_file_for_flux": flags({**parts, "ckpt": tiny_ckpt}, t5_tokenizer, out),
    }[case]
    assert needle in one_line(capsys, txt2img.main, argv)
    assert not out.exists()


def schnell(tmp_path: Path) -> Path:
    cfg = OmegaConf.load(TINY_FLUX_CONFIG)
    cfg.model.params.unet_config.params.guidance_embed = False
    cfg.model.params.time_shift = False
    path = tmp_path / "tiny-schnell.yaml"
    OmegaConf.save(cfg, path)
    return path


def test_a_comfyui_scaled_fp8_file_is_read_as_its_weights(tiny_flux_model, parts, tmp_path):
    """ComfyUI's scaled_fp8 layout: float8 weights and per-tensor scales; read back as their products."""
    from ldm.families import FAMILIES
    from ldm.weights.load import assemble
    sd = {k[len("model.diffusion_model."):]: v for k, v in tiny_flux_model.state_dict().items()
          if k.startswith("model.diffusion_model.")}
    fp8 = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448
            fp8[k], fp8[k[:-6] + "scale_weight"] = (v / scale).to(torch.float8_e4m3fn), scale.reshape(())
        else:
            fp8[k] = v
    path = tmp_path / "flux-fp8.safetensors"
    save_file({k: v.contiguous() for k, v in fp8.items()}, str(path))
    got, _ = assemble(FAMILIES["flux-dev"], path, {n: parts[n] for n in ("ae", "t5", "clip")}, verbose=False)
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    assert got[key].dtype == torch.bfloat16 and not any(k.endswith("scale_weight") for k in got)
    err = (got[key].float() - sd["double_blocks.0.img_attn.qkv.weight"]).abs().max()
    assert err <= 0.07 * sd["double_blocks.0.img_attn.qkv.weight"].abs().max()  # e4m3's 3 mantissa bits


def test_merge_prune_and_lora_flag_on_flux_files(tiny_flux_model, parts, t5_tokenizer, tmp_path):
    """A FLUX LoRA file baked into the released transformer file gives the pictures the adapter gives at sampling
    time (--lora), the merged file keeps the released layout; a training checkpoint prunes to the transformer alone,
    which samples beside the other files."""
    import copy

    from ldm.weights.checkpoint import read_checkpoint, save_checkpoint
    from ldm.weights.lora import LoraSettings, add_lora, lora_state_dict
    model = copy.deepcopy(tiny_flux_model)
    add_lora(model, LoraSettings(rank=2, unet_targets=("img_attn.qkv", "linear1", "linear2")))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn_like(p)  # peft starts B at zero: an adapter that changes the pictures visibly
    lora = save_checkpoint(tmp_path / "adapter.safetensors", lora_state_dict(model))
    merged = load_script("merge_lora").main([str(parts["ckpt"]), str(lora), str(tmp_path / "merged.safetensors")])
    sd, _ = read_checkpoint(merged)
    assert set(sd) == set(read_checkpoint(parts["ckpt"])[0])  # Black Forest Labs' names, no prefix
    txt2img = load_script("stable_txt2img").main
    (with_lora, _) = txt2img(flags(parts, t5_tokenizer, tmp_path / "a", "--lora", str(lora)))
    (baked, _) = txt2img(flags({**parts, "ckpt": merged}, t5_tokenizer, tmp_path / "b"))
    a, b = (np.asarray(Image.open(p)).astype(int) for p in (with_lora, baked))
    (plain, _) = txt2img(flags(parts, t5_tokenizer, tmp_path / "c"))
    assert np.abs(a - b).max() <= 2 and np.abs(a - np.asarray(Image.open(plain)).astype(int)).max() > 10
    whole = save_checkpoint(tmp_path / "last.ckpt", tiny_flux_model.state_dict(), global_step=5)
    pruned = load_script("prune_ckpt").main([str(whole), str(tmp_path / "pruned.safetensors"), "--bf16"])
    sd, meta = read_checkpoint(pruned)
    assert set(sd) == set(read_checkpoint(parts["ckpt"])[0]) and meta["modelspec.architecture"] == "flux-1-dev"
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert txt2img(flags({**parts, "ckpt": pruned}, t5_tokenizer, tmp_path / "d"))


@pytest.mark.parametrize("variant, transformer", [("dev", "flux1-dev-state-dict.tsv"),
                                                  ("schnell", "flux1-schnell-state-dict.tsv")])
def test_the_inference_config_holds_each_released_file_key_for_key(variant, transformer):
    """The whole FLUX.1 model, built on the meta device from its inference config: under each prefix, the keys and
    shapes of the file released for that part (../shared/reference)."""
    from conftest import reference_layout
    from ldm.families import config_family
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(f"configs/flux/flux1-{variant}-inference.yaml")
    assert config_family(config) == f"flux-{variant}"
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for prefix, layout in (("model.diffusion_model.", transformer), ("first_stage_model.", "flux-ae-state-dict.tsv"),
                           (T5, "t5xxl-encoder-state-dict.tsv")):
        ref = {k: shape for k, (shape, _) in reference_layout(layout).items()}
        assert {k[len(prefix):]: s for k, s in ours.items() if k.startswith(prefix)} == ref, prefix
    clip = {k for k in ours if k.startswith(CLIP)}
    assert {k[len(CLIP):] for k in clip} == {k[len("cond_stage_model.transformer."):] for k in reference_layout()
                                             if k.startswith("cond_stage_model.transformer.")}  # SD v1's CLIP-L
    assert set(ours) == set().union(*[{k for k in ours if k.startswith(p)} for p in (
        "model.diffusion_model.", "first_stage_model.", T5, CLIP)])  # nothing else (no schedule buffers)


def test_text_encoder_adapters_take_sd_scripts_names(tiny_flux_model):
    """With text_encoder adapters, CLIP's are lora_te1_ and T5's lora_te3_ (on T5's q, k, v, o)."""
    import copy

    from ldm.weights.lora import LoraSettings, add_lora, lora_state_dict
    model = copy.deepcopy(tiny_flux_model)
    add_lora(model, LoraSettings(rank=2, text_encoder=True, unet_targets=("img_attn.qkv",)))
    keys = set(lora_state_dict(model))
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te3_encoder_block_1_layer_0_SelfAttention_o.lora_up.weight" in keys
    assert "lora_unet_double_blocks_0_img_attn_qkv.alpha" in keys


def test_a_lora_of_another_family_and_fp8_without_float8_are_one_line(parts, t5_tokenizer, tiny_ckpt, tmp_path,
                                                                       capsys, monkeypatch):
    from ldm.weights.checkpoint import save_checkpoint
    from ldm.weights.lora import LoraSettings, add_lora, lora_state_dict
    from conftest import tiny_flux_config
    from ldm.util import instantiate_from_config
    model = instantiate_from_config(tiny_flux_config(t5_tokenizer).model)
    add_lora(model, LoraSettings(rank=2, unet_targets=("img_attn.qkv",)))
    lora = save_checkpoint(tmp_path / "flux-lora.safetensors", lora_state_dict(model))
    line = one_line(capsys, load_script("stable_txt2img").main,
                    ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--lora", str(lora), "--outdir",
                     str(tmp_path / "o"), "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1"])
    assert "no such module in this model (a LoRA for another model?)" in line
    import ldm.modules.lowmem
    monkeypatch.setattr(ldm.modules.lowmem, "fp8_supported", lambda: False)
    import main as main_module
    from helpers import make_folder
    with pytest.raises(SystemExit) as info:
        main_module.main(["--base", "configs/flux/tiny-flux-finetune.yaml", "-t", "--logdir", str(tmp_path / "l"),
                          "--data_root", str(make_folder(tmp_path / "s", 2)), "--class_word", "toy",
                          "--t5_tokenizer", str(t5_tokenizer), "model.params.frozen_dtype=fp8"])
    assert info.value.code == 2
    assert "no usable float8_e4m3fn" in capsys.readouterr().err and not (tmp_path / "l").exists()
