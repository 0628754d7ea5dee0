"""Rebuilding the toy model (scripts/train_toy_model.py): both stages train through main.py on a small world, the
autoencoder on random windows of the scenes, and a stopped rebuild continues where it stopped."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import main as main_module
from conftest import REPO, load_script
from ldm.data import toy_world as tw
from ldm.data.toy_data import ToyWorldDataset
from ldm.weights.checkpoint import read_checkpoint


def test_the_autoencoder_sees_windows_of_the_scenes(tmp_path):
    root = tmp_path / "world"
    records = tw.write_world(root, count=6, seed=3) and tw.read_records(root)
    data = ToyWorldDataset(root, crop_size=32)
    corners = set()
    for i, record in enumerate(records):
        scene = np.asarray(Image.open(root / record["file"]).convert("RGB"), dtype=np.float32) / 127.5 - 1
        for seed in (1, 2, 3):
            item = data[(i, seed)]["image"].permute(1, 2, 0).numpy()  # [H, W, 3] in [-1, 1]
            assert item.shape == (32, 32, 3)
            found = [(y, x) for y in range(33) for x in range(33)
                     if np.allclose(scene[y:y + 32, x:x + 32], item, atol=1e-6)]
            assert found, (i, seed)
            corners.add(found[0])
    assert len(corners) == 3  # the window moves with the item seed the loader gives
    assert np.array_equal(data[(0, 1)]["image"].numpy(), data[(0, 1)]["image"].numpy())  # and are seeded


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
