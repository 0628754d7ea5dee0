"""LoRA: training only adapters on the frozen tiny model, the kohya file, --lora in txt2img, merge_lora."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

import main as main_module
from conftest import REPO, TINY_CONFIG, load_config, load_script, rel_err
from helpers import make_folder
from ldm.weights.checkpoint import read_checkpoint, save_checkpoint
from ldm.weights.load import load_model_from_config
from ldm.weights.lora import load_lora, merge_lora, parse_lora

TINY_FT = REPO / "configs/stable-diffusion/tiny-finetune.yaml"



@pytest.fixture(scope="module")
def lora_run(tiny_ckpt, tmp_path_factory):
    """A 6-step LoRA run from the tiny checkpoint (a stand-in for sd-v1-4.ckpt), alpha 2 on rank 4 (a scale of
    0.5, so a loader that forgets the alpha samples something else)."""
    tmp = tmp_path_factory.mktemp("lora")
    args = ["--base", str(TINY_FT), "-t", "--logdir", str(tmp / "logs"), "-n", "lora", "--actual_resume",
            str(tiny_ckpt), "--data_root", str(make_folder(tmp / "subject", 3)), "--reg_data_root",
            str(make_folder(tmp / "reg", 3, offset=40)), "--class_word", "toy", "--max_steps", "6",
            "--lora_rank", "4", "model.params.lora_config.text_encoder=true", "model.params.lora_config.alpha=2",
            "model.base_learning_rate=1e-3", "lightning.modelcheckpoint.params.every_n_train_steps=3"]
    assert main_module.main(args) == 0
    (run,) = (tmp / "logs").iterdir()
    return run / "checkpoints"


def test_only_adapters_train_and_the_file_is_kohya(lora_run, tiny_ckpt):
    names = sorted(p.name for p in lora_run.iterdir())
    assert {"lora-000003.safetensors", "lora-000006.safetensors", "lora-last.safetensors", "last.ckpt"} <= set(names)
    lora, meta = read_checkpoint(lora_run / "lora-last.safetensors")
    assert meta["global_step"] == 6
    parsed = parse_lora(lora)
    unet = [n for n in parsed if n.startswith("lora_unet_")]
    text = [n for n in parsed if n.startswith("lora_te_text_model_encoder_layers_")]
    # tiny UNet: 6 spatial transformers (input 1, 2; middle; output 3, 4, 5) x 2 attentions x (q, k, v, out);
    # text encoder: 2 layers x 4 projections.
    assert len(unet) == 48 and len(text) == 8
    # sd-scripts' naming: diffusers block names (input block 1 = first attention of down block 0)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in parsed
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0" in parsed  # output block 5
    down, up, alpha = parsed["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert down.shape == (4, 32) and up.shape == (32, 4) and alpha == 2.0
    assert up.abs().max() > 0  # lora_up starts at zero: it moved, so the adapter trained

    # The base weights did not move: last.ckpt holds them under their original names.
    base, _ = read_checkpoint(tiny_ckpt)
    last, _ = read_checkpoint(lora_run / "last.ckpt")
    for k, v in base.items():
        assert torch.equal(last[k], v), k


def test_merged_checkpoint_equals_adapter_applied(lora_run, tiny_ckpt, tmp_path):
    lora, _ = read_checkpoint(lora_run / "lora-last.safetensors")
    merged_path = load_script("merge_lora").main([str(tiny_ckpt), f"{lora_run / 'lora-last.safetensors'}:0.7",
                                             str(tmp_path / "merged.safetensors")])
    config = load_config(TINY_CONFIG)
    merged = load_model_from_config(config, merged_path)
    adapted = load_model_from_config(config, tiny_ckpt)
    assert load_lora(adapted, lora, scale=0.7) == 56
    base = load_model_from_config(config, tiny_ckpt)

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        prompts = ["photo of a sks toy", "a toy"]
        c_a, c_m = adapted.get_learned_conditioning(prompts), merged.get_learned_conditioning(prompts)
        assert rel_err(c_a, c_m) < 1e-5
        e_a, e_m = adapted.apply_model(x, t, c_a), merged.apply_model(x, t, c_m)
        e_base = base.apply_model(x, t, base.get_learned_conditioning(prompts))
    assert rel_err(e_a, e_m) < 1e-5
    assert rel_err(e_base, e_m) > 1e-4  # and the adapter changes something

    txt2img = load_script("stable_txt2img")
    common = ["--config", str(TINY_CONFIG), "--H", "64", "--W", "64", "--ddim_steps", "3", "--n_samples", "1",
              "--n_iter", "1", "--skip_grid", "--prompt", "photo of a sks toy", "--seed", "2"]
    a = txt2img.main(common + ["--ckpt", str(tiny_ckpt), "--lora", f"{lora_run / 'lora-last.safetensors'}:0.7",
                               "--outdir", str(tmp_path / "a")])[0]
    m = txt2img.main(common + ["--ckpt", str(merged_path), "--outdir", str(tmp_path / "m")])[0]
    diff = np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(m), dtype=int))
    assert diff.max() <= 1


def test_the_runs_last_ckpt_samples_prunes_and_merges_with_its_adapters(lora_run, tiny_ckpt, tmp_path):
    """A LoRA run's last.ckpt holds the base weights and the adapters: sampling, pruning and merging it use the
    adapters, with the run's alpha (the file records it; an older file's run config beside it says it), exactly as
    the base checkpoint with the run's kohya file does. Without either, one line points to --lora."""
    from ldm.weights.checkpoint import CheckpointError
    last, kohya = lora_run / "last.ckpt", lora_run / "lora-last.safetensors"
    config = load_config(TINY_CONFIG)
    applied = load_model_from_config(config, tiny_ckpt, verbose=False)
    load_lora(applied, read_checkpoint(kohya)[0])
    base = load_model_from_config(config, tiny_ckpt, verbose=False)
    g = torch.Generator().manual_seed(0)
    x, t, prompts = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), ["photo of a sks toy", "a toy"]

    @torch.no_grad()
    def eps(model):
        return model.apply_model(x, t, model.get_learned_conditioning(prompts))

    e_applied = eps(applied)
    effect = rel_err(eps(base), e_applied)
    assert effect > 3e-4  # the adapters change the prediction; a wrong alpha (x2) would be off by as much
    assert rel_err(eps(load_model_from_config(config, last, verbose=False)), e_applied) < effect / 100

    txt2img = load_script("stable_txt2img")
    common = ["--config", str(TINY_CONFIG), "--H", "64", "--W", "64", "--ddim_steps", "3", "--n_samples", "1",
              "--n_iter", "1", "--skip_grid", "--prompt", "photo of a sks toy", "--seed", "2"]
    a = txt2img.main(common + ["--ckpt", str(tiny_ckpt), "--lora", str(kohya), "--outdir", str(tmp_path / "a")])[0]
    r = txt2img.main(common + ["--ckpt", str(last), "--outdir", str(tmp_path / "r")])[0]
    assert np.abs(np.asarray(Image.open(r), dtype=int) - np.asarray(Image.open(a), dtype=int)).max() <= 1

    base_sd = read_checkpoint(tiny_ckpt)[0]
    expected = merge_lora(base_sd, read_checkpoint(kohya)[0])
    moved = [k for k in expected if not torch.equal(expected[k], base_sd[k])]
    assert len(moved) == 56
    pruned = read_checkpoint(load_script("prune_ckpt").main([str(last), str(tmp_path / "pruned.ckpt")]))[0]
    merged = read_checkpoint(load_script("merge_lora").main([str(last), f"{kohya}:0",
                                                             str(tmp_path / "merged.safetensors")]))[0]
    for out in (pruned, merged):
        assert not [k for k in out if "lora_" in k]
        for k in moved:
            assert rel_err(out[k] - base_sd[k], expected[k] - base_sd[k]) < 1e-4, k

    # An older file without the recorded alpha: the run's config beside it says 2; elsewhere nothing does.
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    del ckpt["lora_alpha"]
    torch.save(ckpt, lora_run / "older.ckpt")
    assert rel_err(eps(load_model_from_config(config, lora_run / "older.ckpt", verbose=False)), e_applied) < \
        effect / 100
    (lora_run / "older.ckpt").rename(tmp_path / "alone.ckpt")
    with pytest.raises(CheckpointError, match=r"alone\.ckpt: a LoRA training checkpoint .* --lora"):
        load_model_from_config(config, tmp_path / "alone.ckpt")


def test_block_names_map_to_diffusers():
    from ldm.weights.lora import diffusers_path
    # SD v1 (2 layers per block): input blocks 1, 2 | 4, 5 | 7, 8 hold attentions; output blocks 3..11 do.
    assert diffusers_path("input_blocks.8.1.proj_in", 2) == "down_blocks.2.attentions.1.proj_in"
    assert diffusers_path("output_blocks.11.1.proj_out", 2) == "up_blocks.3.attentions.2.proj_out"
    assert diffusers_path("output_blocks.3.1.norm", 2) == "up_blocks.1.attentions.0.norm"
    assert diffusers_path("middle_block.1.transformer_blocks.0.attn1.to_q", 2) == \
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"


def test_merge_by_hand():
    w = torch.randn(6, 5)
    down, up = torch.randn(2, 5), torch.randn(6, 2)
    sd = {"model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight": w}
    lora = {"lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.lora_down.weight": down,
            "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.lora_up.weight": up,
            "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.alpha": torch.tensor(1.0)}
    out = merge_lora(sd, lora, scale=0.5)
    expected = w + 0.5 * (1.0 / 2) * up @ down
    torch.testing.assert_close(next(iter(out.values())), expected)
    with pytest.raises(ValueError, match="no such module"):
        merge_lora({"model.diffusion_model.out.2.weight": w}, lora)


def test_lora_run_resumes(tiny_ckpt, tmp_path):
    args = ["--base", str(TINY_FT), "-t", "--logdir", str(tmp_path / "logs"), "-n", "lora", "--actual_resume",
            str(tiny_ckpt), "--data_root", str(make_folder(tmp_path / "subject", 3)), "--class_word", "toy",
            "--max_steps", "5", "--lora_rank", "2", "--allow_any_target",
            "lightning.callbacks.interrupt.target=helpers.InterruptAt",
            "lightning.callbacks.interrupt.params.step=2"]
    with pytest.raises(SystemExit):
        main_module.main(args)
    (run,) = (tmp_path / "logs").iterdir()
    first = read_checkpoint(run / "checkpoints" / "lora-last.safetensors")[0] \
        if (run / "checkpoints" / "lora-last.safetensors").exists() else None
    assert main_module.main(["-r", str(run), "--allow_any_target", "lightning.callbacks.interrupt.params.step=100"]) == 0
    sd = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert sd["global_step"] == 5
    lora, meta = read_checkpoint(run / "checkpoints" / "lora-last.safetensors")
    assert meta["global_step"] == 5 and first is None


def test_lora_errors(tiny_ckpt, tmp_path, capsys):
    bogus = save_checkpoint(tmp_path / "x.safetensors", {"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(2, 3),
                                                          "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(3, 2)})
    with pytest.raises(SystemExit):
        load_script("stable_txt2img").main(["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--lora", str(bogus),
                                       "--H", "64", "--W", "64", "--outdir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lora_unet_nowhere_to_q" in err


def test_diffusers_load_lora_weights_accepts_the_adapter(lora_run, tiny_ckpt, tmp_path):
    """diffusers reads our kohya file (mapping the original block names to its own) and then predicts what our
    model predicts with the adapter applied, for the UNet and the text encoder."""
    import diffusers
    folder = load_script("convert_to_diffusers").main([str(tiny_ckpt), str(tmp_path / "sd"), "--config", str(TINY_CONFIG)])
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    adapter = lora_run / "lora-last.safetensors"
    pipe.load_lora_weights(str(adapter))

    ours = load_model_from_config(load_config(TINY_CONFIG), tiny_ckpt)
    load_lora(ours, read_checkpoint(adapter)[0])
    prompts = ["photo of a sks toy", "a toy on the beach"]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([30, 600])
    with torch.no_grad():
        c = ours.get_learned_conditioning(prompts)
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        c_theirs = pipe.text_encoder(ids.input_ids)[0]
        e_ours = ours.apply_model(x, t, c)
        e_theirs = pipe.unet(x, t, encoder_hidden_states=c).sample
    assert rel_err(c, c_theirs) < 1e-4
    assert rel_err(e_ours, e_theirs) < 1e-4
