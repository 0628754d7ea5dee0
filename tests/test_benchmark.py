"""scripts/benchmark.py: smoke runs of both suites on the tiny config, and the unet suite's UNet config derivation
checked against diffusers'.

No timing assertions: a benchmark is not a timed test. The smoke runs check that every cell was measured and
that the printed table agrees with the JSON file it wrote; the dreambooth suite's parameter and optimizer-state
counts are checked against closed forms (AdamW's two fp32 moments, LoRA's parameters linear in the rank).
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
DREAMBOOTH_SCRIPT = REPO / "scripts/bench_dreambooth.py"
ROWS = ("UNet forward", "train step (s)", "train step, grad ckpt", "DDIM loop")
MEASUREMENTS = ("forward", "train", "train_ckpt", "ddim")


def _load_script(path: Path = SCRIPT) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while the class is being built
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


# ---- --suite dreambooth ------------------------------------------------------------------------------------------
VARIANTS = ("full", "full+ckpt", "unet+ckpt", "unet", "full+ckpt+8bit", "full+ckpt+8bit+mixed",
            "unet+ckpt+8bit+mixed+cached", "lora4+ckpt", "lora16+ckpt")


@pytest.fixture(scope="module")
def dreambooth_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench_db") / "bench.json"
    # Nine cells of ~8 s each, start-up (torch, Lightning, bitsandbytes, peft) included: two at a time.
    cmd = [sys.executable, str(SCRIPT), "--suite", "dreambooth", "--config", "tiny", "--size", "64", "--repeat", "1",
           "--warmup", "0", "--threads", "1", "--jobs", "2", "--markdown", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, {r["variant"]: r for r in json.loads(out.read_text())["results"]}


def test_dreambooth_table_has_every_variant(dreambooth_run: tuple[str, dict]) -> None:
    stdout = dreambooth_run[0]
    assert "config tiny" in stdout and "64 px" in stdout and "bitsandbytes " in stdout
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    header, rows = table[0], table[2:]
    assert "s/step" in header and "trainable params" in header and "optimizer state" in header
    assert [row.strip("|").split("|")[0].strip() for row in rows] == list(VARIANTS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        seconds, per_second = float(cells[1]), float(cells[2])
        peak = float(re.match(r"([\d.]+) (MiB|GiB)", cells[3]).group(1))
        assert seconds > 0 and per_second > 0 and peak > 0, row


def test_dreambooth_json_holds_every_variant(dreambooth_run: tuple[str, dict]) -> None:
    cells = dreambooth_run[1]
    assert set(cells) == set(VARIANTS)
    for r in cells.values():
        assert "error" not in r, r
        assert len(r["seconds"]) == 1 and r["median_s"] > 0 and r["size"] == 64
        assert r["peak_bytes"] >= r["model_bytes"] > 0
        assert r["trainable_params"] > 0 and r["optimizer_state_bytes"] > 0
        assert 0 < r["loss"] < float("inf")


def test_dreambooth_trainable_parameters(dreambooth_run: tuple[str, dict]) -> None:
    """The text encoder adds to full; checkpointing and the optimizer change nothing; LoRA adapters are few and
    r * (in + out) per adapted projection, so exactly linear in the rank."""
    n = {v: r["trainable_params"] for v, r in dreambooth_run[1].items()}
    assert n["full"] == n["full+ckpt"] == n["full+ckpt+8bit"] == n["full+ckpt+8bit+mixed"]
    assert n["unet"] == n["unet+ckpt"] == n["unet+ckpt+8bit+mixed+cached"] < n["full"]
    assert n["lora16+ckpt"] == 4 * n["lora4+ckpt"]
    assert n["lora16+ckpt"] < 0.05 * n["full"] and n["lora16+ckpt"] < 0.1 * n["unet"]


def test_dreambooth_optimizer_state(dreambooth_run: tuple[str, dict]) -> None:
    """fp32 AdamW holds two fp32 moments per parameter (plus a scalar step per tensor); 8-bit AdamW about a
    quarter of that (one byte per moment, plus block scales and the small tensors it keeps in fp32)."""
    cells = dreambooth_run[1]
    for v in ("full", "full+ckpt", "unet", "unet+ckpt", "lora4+ckpt", "lora16+ckpt"):
        assert cells[v]["optimizer"] == "AdamW"
        moments = 8 * cells[v]["trainable_params"]
        assert moments <= cells[v]["optimizer_state_bytes"] <= moments + 4 * 4096, v
    for eight_bit, fp32 in (("full+ckpt+8bit", "full+ckpt"), ("full+ckpt+8bit+mixed", "full+ckpt"),
                            ("unet+ckpt+8bit+mixed+cached", "unet+ckpt")):
        assert cells[eight_bit]["optimizer"] == "AdamW8bit"
        assert cells[eight_bit]["optimizer_state_bytes"] < 0.35 * cells[fp32]["optimizer_state_bytes"], eight_bit


def test_dreambooth_mixed_and_cached_rows(dreambooth_run: tuple[str, dict]) -> None:
    cells = dreambooth_run[1]
    assert cells["full+ckpt+8bit+mixed"]["mixed"] == "bf16" and cells["full+ckpt"]["mixed"] is None
    assert cells["unet+ckpt+8bit+mixed+cached"]["cached"] is True
    assert not any(r["cached"] for v, r in cells.items() if v != "unet+ckpt+8bit+mixed+cached")


def test_dreambooth_variant_selection() -> None:
    suite = _load_script(DREAMBOOTH_SCRIPT)
    assert suite.select_variants("all") == list(VARIANTS)
    assert suite.select_variants("lora4+ckpt,full") == ["lora4+ckpt", "full"]
    with pytest.raises(SystemExit, match="unknown"):
        suite.select_variants("full,half")
