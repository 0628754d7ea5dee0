"""Rebuilding the toy model (scripts/train_toy_model.py): both stages train through main.py on a small world, and a
stopped rebuild continues where it stopped."""
from __future__ import annotations

import torch

import main as main_module
from conftest import REPO, load_script
from ldm.data import toy_world as tw
from ldm.weights.checkpoint import read_checkpoint


def test_both_stages_train_through_main_and_a_stopped_rebuild_continues(tmp_path):
    world, logs = tmp_path / "world", tmp_path / "logs"
    tw.write_world(world, count=40, seed=4)
    common = ["-t", "--logdir", str(logs), f"data.params.root={world}", "data.params.batch_size=4"]
    assert main_module.main(["--base", str(REPO / "configs/toy/autoencoder.yaml"), "-n", "toy_ae", "--max_steps",
                             "2"] + common) == 0
    rebuild = load_script("train_toy_model")
    run_dir, step = rebuild.stage_state(logs, "toy_ae")
    assert step == 2
    ae = run_dir / "checkpoints" / "last.ckpt"
    assert main_module.main(["--base", str(REPO / "configs/toy/ldm.yaml"), "-n", "toy_ldm", "--max_steps", "2",
                             "--vae", str(ae), "model.params.cache_latents=false"] + common) == 0
    ldm_dir, step = rebuild.stage_state(logs, "toy_ldm")
    assert step == 2
    sd, _ = read_checkpoint(ldm_dir / "checkpoints" / "last.ckpt")
    ae_sd, _ = read_checkpoint(ae)
    # the diffusion model works in the autoencoder's latent space, whose weights it carries unchanged
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == ae_sd["post_quant_conv.weight"].shape[0]
    for k, v in ae_sd.items():
        if not k.startswith("loss."):
            assert torch.equal(sd[f"first_stage_model.{k}"], v), k
    # continue the stopped stage to step 3 the way the rebuild does (main.py -r RUN --max_steps N)
    assert main_module.main(["-r", str(ldm_dir), "--max_steps", "3"]) == 0
    assert rebuild.stage_state(logs, "toy_ldm") == (ldm_dir, 3)


def test_the_shipped_model_is_the_kept_stage_2_packed(tmp_path):
    """``--pack STAGE1 STAGE2`` ships the kept stage 2 (assets/toy/build, EMA weights already as the weights) as it
    is: the packed tensors equal the shipped model's, under the same names, in float16 (schedule buffers float32)."""
    rebuild = load_script("train_toy_model")
    packed = read_checkpoint(rebuild.pack(rebuild.STAGE2, tmp_path / "toy-ldm.safetensors"))[0]
    shipped = read_checkpoint(REPO / "assets/toy/toy-ldm.safetensors")[0]
    assert packed.keys() == shipped.keys() and not any(k.startswith("model_ema.") for k in packed)
    assert all(torch.equal(packed[k], shipped[k]) for k in shipped)
    assert packed["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16
