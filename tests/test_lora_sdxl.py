"""SDXL LoRA: a run through main.py training adapters on the UNet and both text encoders of the toy SDXL; the file
sd-scripts would write (original UNet block names, lora_te1_ / lora_te2_ in transformers' CLIP names); diffusers'
StableDiffusionXLPipeline.load_lora_weights reading it into the same predictions; merge_lora; --lora in txt2img."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import main as main_module
from conftest import REPO, TINY_SDXL_CONFIG, load_config, load_script, rel_err
from helpers import make_folder
from ldm.modules.lora import FusedQKVLoRA
from ldm.weights.checkpoint import read_checkpoint, save_checkpoint
from ldm.weights.load import load_model_from_config
from ldm.weights.lora import load_lora, merge_lora, parse_lora

import diffusers  # noqa: E402 - test-only reference, installed with .[test]

TINY_XL_FT = REPO / "configs/stable-diffusion/tiny-sdxl-finetune.yaml"
PROMPTS = ["photo of a sks toy", "a toy on the beach"]
TE2_IN_PROJ = "conditioner.embedders.1.model.transformer.resblocks.{}.attn.in_proj_weight"
WIDTH_2 = 48  # the toy bigG tower's width


@pytest.fixture(scope="module")
def lora_file(tiny_sdxl_ckpt, tmp_path_factory):
    """A 6-step LoRA run (prior preservation on) from the toy SDXL checkpoint, adapters on the UNet's attention and
    on every attention and MLP projection of both text encoders."""
    tmp = tmp_path_factory.mktemp("lora-sdxl")
    args = ["--base", str(TINY_XL_FT), "-t", "--logdir", str(tmp / "logs"), "-n", "lora", "--actual_resume",
            str(tiny_sdxl_ckpt), "--data_root", str(make_folder(tmp / "subject", 3)), "--reg_data_root",
            str(make_folder(tmp / "reg", 3, offset=40)), "--class_word", "toy", "--max_steps", "6",
            "--lora_rank", "4", "model.params.lora_config.text_encoder=true",
            "model.params.lora_config.text_targets=[q_proj,k_proj,v_proj,out_proj,fc1,fc2]",
            "lightning.modelcheckpoint.params.every_n_train_steps=3"]
    assert main_module.main(args) == 0
    (run,) = (tmp / "logs").iterdir()
    return run / "checkpoints" / "lora-last.safetensors"


def random_adapters(lora_file, path, alpha=None):
    """The trained file's modules with large seeded random adapters of mixed ranks, and one q/k/v part left out:
    a mistake in any name, split or scale shows far above the tolerances. ``alpha`` None gives every module
    another alpha; diffusers 0.42's kohya loader drops per-module alphas that differ (its ``alpha_pattern`` keys
    keep the old processor names, and peft ignores them), so files for diffusers have one alpha, as ours do."""
    g = torch.Generator().manual_seed(11)
    sd = {}
    for i, (name, (down, up, _)) in enumerate(sorted(parse_lora(read_checkpoint(lora_file)[0]).items())):
        if name == "lora_te2_text_model_encoder_layers_1_self_attn_k_proj":
            continue
        rank = 1 + i % 4
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, down.shape[1], generator=g) * 0.2
        sd[f"{name}.lora_up.weight"] = torch.randn(up.shape[0], rank, generator=g) * 0.2
        sd[f"{name}.alpha"] = torch.tensor(float(alpha) if alpha is not None else rank * (0.5 + i % 3))
    return save_checkpoint(path, sd)


@pytest.fixture(scope="module")
def strong_lora_file(lora_file, tmp_path_factory):
    return random_adapters(lora_file, tmp_path_factory.mktemp("strong") / "strong.safetensors", alpha=2.0)


def test_adapters_train_on_unet_and_both_text_encoders_under_sd_scripts_names(lora_file, tiny_sdxl_ckpt):
    lora, meta = read_checkpoint(lora_file)
    assert meta["global_step"] == 6
    parsed = parse_lora(lora)
    count = {p: sum(n.startswith(p) for n in parsed) for p in ("lora_unet_", "lora_te1_", "lora_te2_")}
    # Toy UNet: attention at levels 1 and 2 with depths 1 and 2: input blocks 4, 5 (1 block each), 7, 8 (2),
    # middle block (2), output blocks 0-2 (2), 3-5 (1): 17 transformer blocks x 2 attentions x (q, k, v, out).
    # Text encoders: 3 layers x (q, k, v, out, fc1, fc2).
    assert count == {"lora_unet_": 136, "lora_te1_": 18, "lora_te2_": 18} and len(parsed) == 172
    # sd-scripts' SDXL names: the original (sgm) blocks, not diffusers' down_blocks/mid_block/up_blocks.
    assert not [n for n in parsed if any(b in n for b in ("down_blocks", "mid_block", "up_blocks"))]
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0",
                 "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_v",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_text_model_encoder_layers_2_mlp_fc2",
                 "lora_te2_text_model_encoder_layers_1_self_attn_v_proj", "lora_te2_text_model_encoder_layers_2_mlp_fc1",
                 "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"):
        assert name in parsed, name
    down, up, alpha = parsed["lora_te2_text_model_encoder_layers_0_mlp_fc1"]
    assert down.shape == (4, WIDTH_2) and up.shape == (4 * WIDTH_2, 4) and alpha == 4.0
    # The packed q/k/v projection trained as three adapters of its own each (kohya's q_proj/k_proj/v_proj).
    qkv = [parsed[f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj"] for p in "qkv"]
    assert all(d.shape == (4, WIDTH_2) and u.shape == (WIDTH_2, 4) and u.abs().max() > 0 for d, u, _ in qkv)
    assert not torch.equal(qkv[0][0], qkv[1][0])
    # Gradients reached both text encoders (their captions were not cached): lora_up starts at zero and moved.
    assert parsed["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"][1].abs().max() > 0
    assert parsed["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"][1].abs().max() > 0

    base, _ = read_checkpoint(tiny_sdxl_ckpt)  # the base weights did not move
    last, _ = read_checkpoint(lora_file.parent / "last.ckpt")
    for k, v in base.items():
        assert torch.equal(last[k], v), k


def _pipe(folder):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _adapted(module: torch.nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return sum(isinstance(m, BaseTunerLayer) and bool(m.active_adapters) for m in module.modules())


@pytest.mark.parametrize("which", ["trained", "strong"])
def test_diffusers_load_lora_weights_predicts_what_we_predict(which, lora_file, strong_lora_file, tiny_sdxl_ckpt,
                                                              tiny_sdxl_folder):
    """diffusers maps our file (sgm blocks -> its blocks, te2's q/k/v -> its separate projections) onto every
    module, and then its UNet and both text encoders compute what ours compute with the adapter applied."""
    adapter = lora_file if which == "trained" else strong_lora_file
    lora = read_checkpoint(adapter)[0]
    n_te2 = sum(n.startswith("lora_te2_") for n in parse_lora(lora))
    pipe = _pipe(tiny_sdxl_folder)
    pipe.load_lora_weights(str(adapter))
    assert (_adapted(pipe.unet), _adapted(pipe.text_encoder), _adapted(pipe.text_encoder_2)) == (136, 18, n_te2)

    config = load_config(TINY_SDXL_CONFIG)
    ours = load_model_from_config(config, tiny_sdxl_ckpt, verbose=False)
    assert load_lora(ours, lora) == len(parse_lora(lora))
    base = load_model_from_config(config, tiny_sdxl_ckpt, verbose=False)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([30, 600])
    # Our default size conditioning for 64 px: original = target = (64, 64), no crop.
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    with torch.no_grad():
        (z1,), (z2, pooled) = ours.conditioner.embed_text(PROMPTS)[:2]
        ids = [tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
               for tok in (pipe.tokenizer, pipe.tokenizer_2)]
        h1 = pipe.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
        out2 = pipe.text_encoder_2(ids[1], output_hidden_states=True)
        c = ours.get_learned_conditioning(PROMPTS)
        e_ours = ours.apply_model(x, t, c)
        e_theirs = pipe.unet(x, t, encoder_hidden_states=c["c_crossattn"][0],
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        e_base = base.apply_model(x, t, base.get_learned_conditioning(PROMPTS))
    assert rel_err(z1, h1) < 1e-4
    assert rel_err(z2, out2.hidden_states[-2]) < 1e-4 and rel_err(pooled, out2.text_embeds) < 1e-4
    assert rel_err(e_ours, e_theirs) < 1e-4
    assert rel_err(e_base, e_ours) > (1e-3 if which == "trained" else 1e-1)  # and the adapter matters


def test_merged_checkpoint_equals_adapter_applied(lora_file, tiny_sdxl_ckpt, tmp_path):
    adapter = random_adapters(lora_file, tmp_path / "mixed.safetensors")  # every module its own rank and alpha
    merged_path = load_script("merge_lora").main([str(tiny_sdxl_ckpt), f"{adapter}:0.7",
                                                  str(tmp_path / "merged.safetensors")])
    merged_sd, meta = read_checkpoint(merged_path)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    # te2's q/k/v adapters land in their thirds of the packed rows: W[k rows] + 0.7 * alpha / r * up_k @ down_k.
    base_sd = read_checkpoint(tiny_sdxl_ckpt)[0]
    parsed = parse_lora(read_checkpoint(adapter)[0])
    key = TE2_IN_PROJ.format(1)
    for i, part in enumerate("qkv"):
        rows = slice(i * WIDTH_2, (i + 1) * WIDTH_2)
        name = f"lora_te2_text_model_encoder_layers_1_self_attn_{part}_proj"
        expected = base_sd[key][rows]
        if name in parsed:  # k has no adapter in this file: its rows stay as they were
            down, up, alpha = parsed[name]
            expected = expected + 0.7 * alpha / down.shape[0] * up @ down
        torch.testing.assert_close(merged_sd[key][rows], expected)

    config = load_config(TINY_SDXL_CONFIG)
    merged = load_model_from_config(config, merged_path, verbose=False)
    adapted = load_model_from_config(config, tiny_sdxl_ckpt, verbose=False)
    load_lora(adapted, read_checkpoint(adapter)[0], scale=0.7)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        c_a, c_m = adapted.get_learned_conditioning(PROMPTS), merged.get_learned_conditioning(PROMPTS)
        assert rel_err(c_a["c_crossattn"][0], c_m["c_crossattn"][0]) < 1e-5 and rel_err(c_a["y"], c_m["y"]) < 1e-5
        assert rel_err(adapted.apply_model(x, t, c_a), merged.apply_model(x, t, c_m)) < 1e-5


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


def test_txt2img_lora_changes_the_pictures_as_merging_does(lora_file, tiny_sdxl_ckpt, tmp_path):
    merged = load_script("merge_lora").main([str(tiny_sdxl_ckpt), f"{lora_file}:0.7",
                                             str(tmp_path / "merged.safetensors")])
    txt2img = load_script("stable_txt2img")
    common = ["--config", str(TINY_SDXL_CONFIG), "--H", "64", "--W", "64", "--ddim_steps", "3", "--n_samples", "1",
              "--n_iter", "1", "--skip_grid", "--prompt", "photo of a sks toy", "--seed", "2"]
    applied = txt2img.main(common + ["--ckpt", str(tiny_sdxl_ckpt), "--lora", f"{lora_file}:0.7",
                                     "--outdir", str(tmp_path / "a")])[0]
    base = txt2img.main(common + ["--ckpt", str(tiny_sdxl_ckpt), "--outdir", str(tmp_path / "b")])[0]
    baked = txt2img.main(common + ["--ckpt", str(merged), "--outdir", str(tmp_path / "m")])[0]
    assert np.abs(_pixels(applied) - _pixels(baked)).max() <= 1
    assert np.abs(_pixels(applied) - _pixels(base)).mean() > 1.0


def test_the_runs_last_ckpt_bakes_as_its_kohya_file_merges(lora_file, tiny_sdxl_ckpt):
    """The run's last.ckpt (base weights + peft adapters + the packed q/k/v parts of bigG's in_proj) baked for
    sampling equals the base merged with the run's kohya file: every adapted weight, each q/k/v third included."""
    from ldm.weights.checkpoint import bake_adapters
    sd, meta = read_checkpoint(lora_file.parent / "last.ckpt")
    baked, n = bake_adapters(sd, meta, lora_file.parent / "last.ckpt")
    base = read_checkpoint(tiny_sdxl_ckpt)[0]
    expected = merge_lora(base, read_checkpoint(lora_file)[0])
    moved = [k for k in expected if not torch.equal(expected[k], base[k])]
    assert n == len(parse_lora(read_checkpoint(lora_file)[0])) and TE2_IN_PROJ.format(1) in moved
    assert set(baked) == set(base)
    for k in moved:
        assert rel_err(baked[k] - base[k], expected[k] - base[k]) < 1e-4, k


def test_packed_qkv_adapter_is_one_fused_low_rank_update():
    """Three adapters of ranks 2, 3, 1 on the rows of a packed projection = the rank-6 update with down
    cat(A_q, A_k, A_v) and block-diagonal up (scaled per block), computed here by hand."""
    g = torch.Generator().manual_seed(3)
    ranks, alphas = {"q": 2, "k": 3, "v": 1}, {"q": 4.0, "k": 1.5, "v": 1.0}
    adapter = FusedQKVLoRA(8, ranks, alphas)
    with torch.no_grad():
        for p in "qkv":
            adapter.lora_A[p].copy_(torch.randn(ranks[p], 8, generator=g))
            adapter.lora_B[p].copy_(torch.randn(8, ranks[p], generator=g))
    down = torch.cat([adapter.lora_A[p] for p in "qkv"])
    up = torch.block_diag(*[adapter.lora_B[p] * alphas[p] / ranks[p] for p in "qkv"])
    x = torch.randn(2, 5, 8, generator=g)
    torch.testing.assert_close(adapter(x), x @ (up @ down).T)
    only_v = FusedQKVLoRA(8, {"v": 1}, {"v": 1.0})  # a missing part adds nothing to its rows
    assert torch.equal(only_v(x)[..., :16], torch.zeros(2, 5, 16))


def test_lora_for_another_family_fails_with_one_line(strong_lora_file, tiny_ckpt, tmp_path, capsys):
    """An SDXL adapter on the SD v1 model: named modules it does not have, said in one line."""
    with pytest.raises(SystemExit):
        load_script("stable_txt2img").main(["--config", str(REPO / "configs/stable-diffusion/tiny-inference.yaml"),
                                            "--ckpt", str(tiny_ckpt), "--lora", str(strong_lora_file), "--H", "64",
                                            "--W", "64", "--outdir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such module in this model" in err
    with pytest.raises(ValueError, match="no such module in the base checkpoint"):
        merge_lora(read_checkpoint(tiny_ckpt)[0], read_checkpoint(strong_lora_file)[0])
