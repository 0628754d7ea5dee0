"""The layout's promises: old run folders still resume after the package moves (a run folder written before the
move, checked in as a fixture), and every shipped config builds."""
from __future__ import annotations

import shutil

import torch

import main as main_module
from conftest import REPO
from helpers import make_folder

SAVED_RUN = REPO / "tests" / "fixtures" / "saved-run"


def test_a_run_folder_saved_before_the_move_resumes(tmp_path):
    """A tiny LoRA run of 2 steps, written by main.py before ldm/ was grouped by job: its saved config names the
    old targets (ldm.lr_scheduler, ldm.callbacks, ldm.webui.progress, ...), its checkpoint holds Lightning's
    loop, callback and optimizer states. ``-r`` continues it to step 4 (photos given again: the saved paths were
    the writing machine's)."""
    run = tmp_path / "logs" / "2026-12-03T14-10-08_saved_run"
    shutil.copytree(SAVED_RUN, run)
    saved = (run / "configs" / "2026-12-03T14-10-08-project.yaml").read_text()
    for target in ("ldm.models.diffusion.ddpm.LatentDiffusion", "ldm.lr_scheduler.LambdaLinearScheduler",
                   "ldm.callbacks.ImageLogger", "ldm.webui.progress.LiveProgress",
                   "ldm.data.dreambooth.DreamBoothDataModule", "ldm.modules.encoders.modules.FrozenCLIPEmbedder"):
        assert f"target: {target}\n" in saved
    subject = make_folder(tmp_path / "subject", 3)
    reg = make_folder(tmp_path / "reg", 3, offset=50)
    assert main_module.main(["-r", str(run), "--data_root", str(subject), "--reg_data_root", str(reg),
                             "--max_steps", "4"]) == 0
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["batches_trained"] == 4
    before = torch.load(SAVED_RUN / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    lora = [k for k in before if "lora_" in k]
    assert lora and any(not torch.equal(before[k], resumed["state_dict"][k]) for k in lora)  # it trained on
    frozen = [k for k in before if k.startswith("first_stage_model.")]
    assert all(torch.equal(before[k], resumed["state_dict"][k]) for k in frozen)
