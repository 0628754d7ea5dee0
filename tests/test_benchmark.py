"""scripts/benchmark.py: a smoke run on the tiny config, and its UNet config derivation checked against diffusers'.

No timing assertions: a benchmark is not a timed test. The smoke run checks that every cell was measured and
that the printed table agrees with the JSON file it wrote.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts/benchmark.py"
ROWS = ("UNet forward", "train step (s)", "train step, grad ckpt", "DDIM loop")
MEASUREMENTS = ("forward", "train", "train_ckpt", "ddim")


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, float]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # One torch thread per cell (a multi-thread OpenMP team stalls behind other jobs on a shared machine), two
    # cells at once: start-up (importing torch and diffusers, ~5 s) dominates the eight tiny cells.
    cmd = [sys.executable, str(SCRIPT), "--config", "tiny", "--latent", "8", "--batch", "1", "--repeat", "1",
           "--warmup", "0", "--steps", "2", "--threads", "1", "--jobs", "2", "--markdown", "--json", str(out)]
    tic = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    elapsed = time.perf_counter() - tic
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, json.loads(out.read_text()), elapsed


def test_smoke_run_is_quick(smoke_run: tuple[str, dict, float]) -> None:
    assert smoke_run[2] < 60, f"the tiny benchmark took {smoke_run[2]:.0f} s"


def test_table_has_every_row_and_both_implementations(smoke_run: tuple[str, dict, float]) -> None:
    stdout = smoke_run[0]
    assert "torch " in stdout and "diffusers " in stdout and "config tiny" in stdout and "batch 1" in stdout
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    header, rows = table[0], table[2:]
    assert "ours" in header and "diffusers" in header
    assert len(rows) == len(ROWS)
    for label, row in zip(ROWS, rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0].startswith(label)
        seconds = [float(cells[1]), float(cells[2])]
        peaks = [float(re.match(r"([\d.]+) (MiB|GiB)", cells[i]).group(1)) for i in (4, 5)]
        assert min(seconds) > 0 and min(peaks) > 0, row


def test_json_holds_every_cell(smoke_run: tuple[str, dict, float]) -> None:
    data = smoke_run[1]
    assert data["settings"]["config"] == "tiny" and data["settings"]["latent"] == 8
    cells = {(r["impl"], r["measurement"]): r for r in data["results"]}
    assert set(cells) == {(i, m) for i in ("ours", "diffusers") for m in MEASUREMENTS}
    for r in cells.values():
        assert "error" not in r, r
        assert len(r["seconds"]) == 1 and r["median_s"] > 0
        assert r["peak_bytes"] >= r["model_bytes"] > 0
    # 2 DDIM steps, one UNet call each (guidance batches [uncond; cond]); a training step is one call.
    assert cells["ours", "ddim"]["unet_calls"] == cells["diffusers", "ddim"]["unet_calls"] == 2
    assert cells["ours", "train"]["unet_calls"] == 1


@pytest.mark.parametrize("name", ["tiny", "v1"])
def test_diffusers_config_matches_diffusers_own_derivation(name: str) -> None:
    """Our derivation against diffusers' ``create_unet_diffusers_config_from_ldm``, an independent reading."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    from omegaconf import OmegaConf
    bench = _load_script()
    original = OmegaConf.to_container(OmegaConf.load(bench.CONFIGS[name]), resolve=True)
    theirs = create_unet_diffusers_config_from_ldm(original, {})
    ours = bench.diffusers_unet_config(original["model"]["params"]["unet_config"]["params"])
    def plain(value: object) -> object:
        return list(value) if isinstance(value, (list, tuple)) else value

    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                "cross_attention_dim", "attention_head_dim", "transformer_layers_per_block"):
        assert plain(ours[key]) == plain(theirs[key]), key


def test_both_implementations_hold_the_same_weights() -> None:
    """Same seeded tensors on both sides: compare each tensor's shape and sum, whatever its name."""
    bench = _load_script()
    params = bench.load_model_params(bench.CONFIGS["tiny"])["unet_config"]["params"]

    def fingerprint(impl: str) -> list[tuple[tuple[int, ...], float]]:
        model = bench.build_unet(impl, params)
        return sorted((tuple(p.shape), round(float(p.detach().double().sum()), 6)) for p in model.parameters())

    assert fingerprint("ours") == fingerprint("diffusers")


def test_v1_gives_the_standard_sd_v1_unet() -> None:
    """The published SD v1 UNet config (runwayml/stable-diffusion-v1-5, unet/config.json)."""
    bench = _load_script()
    cfg = bench.diffusers_unet_config(bench.load_model_params(bench.CONFIGS["v1"])["unet_config"]["params"])
    assert cfg["block_out_channels"] == (320, 640, 1280, 1280)
    assert cfg["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert cfg["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert (cfg["layers_per_block"], cfg["cross_attention_dim"], cfg["attention_head_dim"]) == (2, 768, 8)
