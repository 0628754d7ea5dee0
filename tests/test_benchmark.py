"""scripts/benchmark.py and the ``benchmarks`` package: both suites run on the tiny configs, checked against what
the benchmark cannot produce itself.

No timing assertions: a benchmark is not a timed test. Instead: the two UNet implementations (separate processes)
compute the same losses and outputs; the DreamBooth variants that only save memory keep the first-step loss;
parameter and optimizer-state counts equal closed forms from the config; the printed table agrees with the JSON
file written; each cell ran in its own process; failures and unknown selections are reported, not hidden.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from benchmarks.suite_dreambooth import fmt_count
from conftest import REPO, diffusers_unet_config
from ldm.util import fmt_bytes

SCRIPT = REPO / "scripts/benchmark.py"
UNET_ROWS = {"forward": "UNet forward (s/call)", "train": "train step (s)",
             "train_ckpt": "train step, grad ckpt (s)", "ddim": "DDIM loop (s/image)"}
#: One row per code path of the step (each row is a process of its own, ~10 s to start): the memory savers, then the
#: lean-training switches (compile is left out: compiling takes minutes on a CPU; it has its own test below).
VARIANTS = ("full", "full+ckpt", "unet+ckpt", "unet+ckpt+8bit+mixed+cached", "lora16+ckpt",
            "full+ckpt+8bit+fused", "full+ckpt+bf16w", "full+ckpt+cl", "unet+ckpt+8bit+fused+bf16w+cached")
#: Rows whose first-step loss differs from full's in rounding only: autocast, bf16 weights, channels-last kernels.
ROUNDING = ("mixed", "bf16w", "cl")
CLIP_VOCAB = 49408  # CLIP's BPE vocabulary: 256 bytes x 2 (with and without </w>), 48,894 merges, 2 specials
# One torch thread per cell (a multi-thread OpenMP team stalls behind other jobs on a shared machine), two cells at
# once: start-up (importing torch, diffusers, Lightning: ~5 s) dominates the tiny cells.
# --fork: each cell forked from a process that has done the imports (benchmarks/zygote.py), ~11 s less per cell;
# peer_run's cells are new interpreters (test_fork_and_new_interpreters_measure_the_same_step compares).
COMMON = ("--config", "tiny", "--repeat", "1", "--warmup", "0", "--threads", "1", "--jobs", "2", "--markdown",
          "--fork")


def run_benchmark(*flags: str, json_path: Path, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags, "--json", str(json_path)], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)
    data = json.loads(json_path.read_text()) if json_path.exists() else {}
    return proc, data


def table(stdout: str) -> list[list[str]]:
    """The Markdown table's body rows, as cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def peak_text(r: dict) -> str:
    over = r["peak_bytes"] - r["model_bytes"]
    return f"{fmt_bytes(r['peak_bytes'])} ({'+' if over >= 0 else '-'}{fmt_bytes(abs(over))})"


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench") / "unet.json"
    proc, data = run_benchmark(*COMMON, "--latent", "8", "--batch", "1", "--steps", "2", json_path=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, data


@pytest.fixture(scope="module")
def dreambooth_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench") / "dreambooth.json"
    proc, data = run_benchmark("--suite", "dreambooth", *COMMON, "--size", "64", "--variants", ",".join(VARIANTS),
                               json_path=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, data


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """Two of our rows and diffusers' train_dreambooth.py step with the options each has."""
    out = tmp_path_factory.mktemp("bench") / "peer.json"
    proc, data = run_benchmark("--suite", "dreambooth", *COMMON[:-1], "--variants", "full,full+ckpt+8bit+fused",
                               "--peer", "diffusers", json_path=out)  # new interpreters (no --fork)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, data


@pytest.fixture(scope="module")
def flux_dreambooth_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """tiny-flux's rows (--variants all: the LoRA recipe, + bf16, fp8, fp8t5, cached, swap3, the full fine-tune) and
    diffusers' train_dreambooth_lora_flux.py step beside the recipe: eight cells, two at a time, one warm-up and
    one timed step each."""
    out = tmp_path_factory.mktemp("bench") / "dreambooth-flux.json"
    proc, data = run_benchmark("--suite", "dreambooth", "--config", "tiny-flux", "--size", "64", "--repeat", "1",
                               "--warmup", "1", "--threads", "1", "--jobs", "2", "--markdown", "--peer", "diffusers",
                               "--peer-rows", "reference", "--fork", json_path=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, data


@pytest.fixture(scope="module")
def sdxl_unet_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench") / "unet-sdxl.json"
    proc, data = run_benchmark(*COMMON[:1], "tiny-sdxl", *COMMON[2:], "--latent", "8", "--batch", "1", "--steps",
                               "2", "--only", "forward,train,ddim", "--profile", "3", json_path=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, data


@pytest.fixture(scope="module")
def sdxl_dreambooth_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench") / "dreambooth-sdxl.json"
    proc, data = run_benchmark("--suite", "dreambooth", *COMMON[:1], "tiny-sdxl", *COMMON[2:], json_path=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, data


# ---- --suite unet ------------------------------------------------------------------------------------------------
def test_unet_implementations_compute_the_same_thing(unet_run: tuple[str, dict]) -> None:
    """Ours and diffusers' UNet, each in its own process, agree on the first call's result: the forward's
    prediction, the training loss (with and without checkpointing) and the DDIM sample."""
    cells = {(r["impl"], r["measurement"]): r for r in unet_run[1]["results"]}
    assert set(cells) == {(i, m) for i in ("ours", "diffusers") for m in UNET_ROWS}
    out = {key: r["first_output"] for key, r in cells.items()}
    for m in UNET_ROWS:
        assert math.isclose(out["ours", m], out["diffusers", m], rel_tol=1e-5), m
    assert out["ours", "train"] == out["ours", "train_ckpt"]  # checkpointing recomputes, it does not change
    # 2 DDIM steps, one UNet call each (guidance batches [uncond; cond]); a training step is one call.
    assert cells["ours", "ddim"]["unet_calls"] == cells["diffusers", "ddim"]["unet_calls"] == 2
    assert cells["ours", "train"]["unet_calls"] == 1


def test_unet_table_agrees_with_json(unet_run: tuple[str, dict]) -> None:
    stdout, data = unet_run
    assert data["complete"] and data["settings"]["latent"] == 8 and data["settings"]["suite"] == "unet"
    assert "config tiny" in stdout and "batch 1" in stdout and "diffusers " in stdout
    cells = {(r["impl"], r["measurement"]): r for r in data["results"]}
    rows = table(stdout)
    assert [row[0] for row in rows] == list(UNET_ROWS.values())
    for m, row in zip(UNET_ROWS, rows):
        o, d = cells["ours", m], cells["diffusers", m]
        assert row[1:] == [f"{o['median_s']:.4g}", f"{d['median_s']:.4g}", f"{o['median_s'] / d['median_s']:.2f}",
                           peak_text(o), peak_text(d), f"{o['peak_bytes'] / d['peak_bytes']:.2f}",
                           f"{(o['peak_bytes'] - o['model_bytes']) / (d['peak_bytes'] - d['model_bytes']):.2f}"]


def test_unet_suite_builds_diffusers_from_the_same_config_as_diffusers_own_reader() -> None:
    """The suite's diffusers model has the config diffusers' own single-file reader derives (tests/conftest.py),
    and holds our UNet's tensors: the outputs agree."""
    import torch
    from diffusers import UNet2DConditionModel
    from benchmarks.suite_unet import build_unet
    from ldm.export.diffusers import model_params
    params = model_params(OmegaConf.load(REPO / "configs/stable-diffusion/tiny-inference.yaml"))
    theirs, ours = build_unet("diffusers", params).eval(), build_unet("ours", params).eval()
    assert isinstance(theirs, UNet2DConditionModel)
    reference = diffusers_unet_config(params["unet_config"]["params"],
                                      params["first_stage_config"]["params"]["ddconfig"]["ch_mult"])
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                "cross_attention_dim", "attention_head_dim", "transformer_layers_per_block"):
        plain = [(list(v) if isinstance(v, (list, tuple)) else v) for v in (theirs.config[key], reference[key])]
        assert plain[0] == plain[1], key
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        expected = ours(x, t, context=c)
        assert expected.abs().max() > 0.01  # not the zero output of a zero-initialised last layer
        assert torch.allclose(theirs(x, t, encoder_hidden_states=c).sample, expected, atol=1e-5)


def test_profile_table_names_each_node_whole() -> None:
    """CPU attention's backward node has a 45-character name: the --profile table must not cut it (a node the
    reader cannot search for is no use), and each column keeps its numbers in line."""
    from benchmarks.profile import format_profiles
    long = "ScaledDotProductFlashAttentionForCpuBackward0"
    profiles = [{"backward_ms": 10.0, "ops": [[long, 4, 6.0], ["ConvolutionBackward0", 8, 3.0]]},
                {"backward_ms": 5.0, "ops": [["ConvolutionBackward0", 8, 4.0]]}]
    text = format_profiles(["ours", "diffusers"], profiles)
    header, first, second, total = text.splitlines()[1:5]
    assert long in first and "6.00 ms   60%" in first and "4.00 ms   80%" in first and "3.00 ms   30%" in second
    column = header.index("diffusers")  # the second implementation's column, on every line
    assert first.index("ConvolutionBackward0") == column == total.index("backward total", column)
    assert total.index("5.00 ms") == first.index("4.00 ms")


def test_unet_suite_takes_a_config_without_image_size() -> None:
    """diffusers' sample_size is then the latent side of the model that config builds (LatentDiffusion's
    default), as ldm.export.diffusers.unet_config now reads it."""
    from benchmarks.suite_unet import build_unet
    from ldm.export.diffusers import model_params
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(REPO / "configs/stable-diffusion/tiny-inference.yaml")
    del config.model.params["image_size"]
    built = instantiate_from_config(config.model)
    assert build_unet("diffusers", model_params(config)).config.sample_size == built.image_size != 8


# ---- --suite dreambooth ------------------------------------------------------------------------------------------
def transformer_widths(unet: dict[str, Any]) -> list[int]:
    """The width of every transformer block in SD's UNet: ``num_res_blocks`` per attention level going down,
    one more per level going up, and one in the middle block at the deepest width."""
    mults, depth = unet["channel_mult"], unet.get("transformer_depth", 1)
    levels = [i for i in range(len(mults)) if 2 ** i in unet["attention_resolutions"]]
    per_level = 2 * unet["num_res_blocks"] + 1
    return depth * ([unet["model_channels"] * mults[i] for i in levels for _ in range(per_level)]
                    + [unet["model_channels"] * mults[-1]])


def expected_counts() -> dict[str, tuple[int, int]]:
    """(parameters, tensors) trained by each kind of variant, from the tiny fine-tuning config alone.

    UNet: diffusers' own UNet2DConditionModel of the config diffusers derives (same network, tensor for
    tensor). CLIP text tower: token + position embeddings, per layer q/k/v/out and two MLP projections with
    biases and two LayerNorms, a final LayerNorm. LoRA: r * (in + out) per adapted projection, four in
    self-attention (C -> C) and four in cross-attention (k and v read the context D)."""
    import torch
    from diffusers import UNet2DConditionModel
    params = OmegaConf.to_container(OmegaConf.load(REPO / "configs/stable-diffusion/tiny-finetune.yaml"),
                                    resolve=True)["model"]["params"]
    unet = params["unet_config"]["params"]
    with torch.device("meta"):
        ref = UNet2DConditionModel(**diffusers_unet_config(unet, params["first_stage_config"]["params"]
                                                           ["ddconfig"]["ch_mult"]))
    unet_counts = (sum(p.numel() for p in ref.parameters()), len(list(ref.parameters())))
    clip = params["cond_stage_config"]["params"]
    w, m = clip["width"], clip["mlp_dim"]
    per_layer = 4 * (w * w + w) + (w * m + m) + (m * w + w) + 2 * 2 * w
    clip_counts = ((CLIP_VOCAB + clip["max_length"]) * w + clip["layers"] * per_layer + 2 * w,
                   2 + 16 * clip["layers"] + 2)
    widths, d = transformer_widths(unet), unet["context_dim"]
    lora = sum(4 * 2 * c + (2 * c + 2 * (d + c) + 2 * c) for c in widths)
    return {"unet": unet_counts, "full": (unet_counts[0] + clip_counts[0], unet_counts[1] + clip_counts[1]),
            "lora4": (4 * lora, 2 * 8 * len(widths)), "lora16": (16 * lora, 2 * 8 * len(widths))}


def test_dreambooth_trainable_parameters_match_closed_forms(dreambooth_run: tuple[str, dict]) -> None:
    cells = {r["variant"]: r for r in dreambooth_run[1]["results"]}
    assert list(cells) == list(VARIANTS)
    expected = expected_counts()
    for name, r in cells.items():
        kind = name.split("+")[0]
        assert (r["trainable_params"], r["trainable_tensors"]) == expected[kind], name


def test_dreambooth_optimizer_state_matches_closed_forms(dreambooth_run: tuple[str, dict]) -> None:
    """torch's AdamW: two fp32 moments per parameter and a 4-byte step per tensor, exactly. bitsandbytes'
    AdamW8bit: at least one byte per moment, and under 35 % of the fp32 state (a quarter plus per-block scales
    and the tensors too small to quantise, which it keeps in fp32)."""
    cells = {r["variant"]: r for r in dreambooth_run[1]["results"]}
    for name, r in cells.items():
        if "8bit" in name:
            fp32 = cells[name.split("+")[0] + "+ckpt"]["optimizer_state_bytes"]
            assert r["optimizer"] == "AdamW8bit"
            assert 2 * r["trainable_params"] <= r["optimizer_state_bytes"] < 0.35 * fp32, name
        else:
            assert r["optimizer"] == "AdamW"
            assert r["optimizer_state_bytes"] == 8 * r["trainable_params"] + 4 * r["trainable_tensors"], name


def test_dreambooth_memory_savers_keep_the_loss(dreambooth_run: tuple[str, dict]) -> None:
    """Same base weights, same batch, same per-step draws: checkpointing, a frozen text encoder, 8-bit moments,
    zero-initialised LoRA adapters and fused backward (the loss comes before any update) leave the first step's
    loss bit for bit; bf16 autocast and bf16-stored weights change it a little, channels-last kernels by
    rounding only, and cached latents only through that autocast."""
    cells = {r["variant"]: r for r in dreambooth_run[1]["results"]}
    loss = {name: r["first_loss"] for name, r in cells.items()}
    exact = [v for v in VARIANTS if not any(flag in v.split("+") for flag in ROUNDING)]
    assert {loss[v] for v in exact} == {loss["full"]} and 0 < loss["full"] < float("inf")
    for v in set(VARIANTS) - set(exact):
        assert math.isclose(loss[v], loss["full"], rel_tol=1e-5 if v.endswith("+cl") else 1e-2), v
    for v in ("unet+ckpt+8bit+mixed+cached", "full+ckpt+bf16w"):
        assert loss[v] != loss["full"], v
    assert [v for v, r in cells.items() if r["cached"]] == ["unet+ckpt+8bit+mixed+cached",
                                                            "unet+ckpt+8bit+fused+bf16w+cached"]


def test_dreambooth_lean_rows_store_and_step_as_asked(dreambooth_run: tuple[str, dict]) -> None:
    """bf16w rows hold their trainable weights in bf16 (the optimizer state stays fp32 or 8-bit: the closed forms
    above); fused and bf16w rows step through one inner optimizer per tensor."""
    cells = {r["variant"]: r for r in dreambooth_run[1]["results"]}
    for name, r in cells.items():
        flags = name.split("+")
        assert r["weights_dtype"] == ("bfloat16" if "bf16w" in flags else "float32"), name
        assert r["per_tensor"] == ("fused" in flags or "bf16w" in flags), name


def test_dreambooth_table_agrees_with_json(dreambooth_run: tuple[str, dict]) -> None:
    stdout, data = dreambooth_run
    assert data["complete"] and data["settings"]["size"] == 64
    assert "config tiny" in stdout and "64 px" in stdout and "bitsandbytes " in stdout
    cells = {r["variant"]: r for r in data["results"]}
    ref = cells["full+ckpt"]
    rows = table(stdout)
    assert [row[0] for row in rows] == list(VARIANTS)
    for row in rows:
        r = cells[row[0]]
        assert (row[1], row[3], row[4], row[6], row[7]) == (
            f"{r['median_s']:.4g}", peak_text(r), fmt_bytes(r["model_bytes"]), fmt_bytes(r["optimizer_state_bytes"]),
            f"{r['median_s'] / ref['median_s']:.2f}, {r['peak_bytes'] / ref['peak_bytes']:.2f}"), row[0]


# ---- --peer diffusers ----------------------------------------------------------------------------------------
def test_peer_step_computes_our_loss(peer_run: tuple[str, dict]) -> None:
    """diffusers' train_dreambooth.py step (its UNet, VAE, CLIPTextModel and DDPMScheduler, holding our weights
    through diffusers' single-file converters) computes the loss ours does from the same inputs, trains as many
    parameters and keeps as much optimizer state; each ran in its own process."""
    results = peer_run[1]["results"]
    ours = {r["variant"]: r for r in results if "impl" not in r}
    peer = {r["variant"]: r for r in results if r.get("impl") == "diffusers"}
    assert list(ours) == ["full", "full+ckpt+8bit+fused"] and list(peer) == ["full", "full+ckpt+8bit"]
    assert math.isclose(peer["full"]["first_loss"], ours["full"]["first_loss"], rel_tol=1e-5)
    assert math.isclose(peer["full+ckpt+8bit"]["first_loss"], ours["full"]["first_loss"], rel_tol=1e-5)
    for name, base in (("full", "full"), ("full+ckpt+8bit+fused", "full+ckpt+8bit")):
        assert (peer[base]["trainable_params"], peer[base]["trainable_tensors"], peer[base]["optimizer"]) == (
            ours[name]["trainable_params"], ours[name]["trainable_tensors"], ours[name]["optimizer"])
    assert peer["full"]["optimizer_state_bytes"] == ours["full"]["optimizer_state_bytes"]
    assert len({r["pid"] for r in results}) == len(results)


def test_peer_table_agrees_with_json(peer_run: tuple[str, dict]) -> None:
    stdout, data = peer_run
    results = data["results"]
    ours = {r["variant"]: r for r in results if "impl" not in r}
    peer = {r["variant"]: r for r in results if r.get("impl") == "diffusers"}
    body = [row for row in table(stdout) if "(peer: " in row[0]]
    assert [row[0] for row in body] == ["full (peer: full)", "full+ckpt+8bit+fused (peer: full+ckpt+8bit)"]
    for row, (name, base) in zip(body, (("full", "full"), ("full+ckpt+8bit+fused", "full+ckpt+8bit"))):
        o, d = ours[name], peer[base]
        assert row[1:] == [f"{o['median_s']:.4g}", f"{d['median_s']:.4g}", f"{o['median_s'] / d['median_s']:.2f}",
                           peak_text(o), peak_text(d), f"{o['peak_bytes'] / d['peak_bytes']:.2f}",
                           f"{(o['peak_bytes'] - o['model_bytes']) / (d['peak_bytes'] - d['model_bytes']):.2f}"]


# ---- SDXL --------------------------------------------------------------------------------------------------------
def test_sdxl_unet_implementations_agree_and_table_matches_json(sdxl_unet_run: tuple[str, dict]) -> None:
    """Our SDXL UNet and diffusers' (addition_embed_type text_time, the same weights and size numbers) give the
    same forward, loss and DDIM sample; the table has their numbers, and --profile the backward nodes of each."""
    stdout, data = sdxl_unet_run
    cells = {(r["impl"], r["measurement"]): r for r in data["results"]}
    for m in ("forward", "train", "ddim"):
        assert math.isclose(cells["ours", m]["first_output"], cells["diffusers", m]["first_output"], rel_tol=1e-5), m
        assert cells["ours", m]["sdxl"]
    rows = {row[0]: row for row in table(stdout)}
    for m in ("forward", "train", "ddim"):
        o, d = cells["ours", m], cells["diffusers", m]
        assert rows[UNET_ROWS[m]][1:4] == [f"{o['median_s']:.4g}", f"{d['median_s']:.4g}",
                                           f"{o['median_s'] / d['median_s']:.2f}"]
    assert "config tiny-sdxl" in stdout and "added_cond_kwargs" in stdout
    for impl in ("ours", "diffusers"):
        profile = cells[impl, "train"]["profile"]
        assert len(profile["ops"]) == 3 and profile["backward_ms"] >= sum(op[2] for op in profile["ops"]) > 0
        assert profile["ops"][0][0] in stdout
    assert "Backward per autograd node" in stdout


def test_sdxl_dreambooth_rows_run_and_agree_with_json(sdxl_dreambooth_run: tuple[str, dict]) -> None:
    """The SDXL LoRA recipe (sdxl-dreambooth-lora.yaml at tiny width) and a full UNet fine-tune, plain and lean:
    every row ran, the table shows the JSON's numbers against the recipe, and the lean rows start from the same
    loss (fused: exactly; bf16 weights: within rounding)."""
    stdout, data = sdxl_dreambooth_run
    from benchmarks.suite_dreambooth import SDXL_RECIPE, SDXL_VARIANTS
    cells = {r["variant"]: r for r in data["results"]}
    assert list(cells) == list(SDXL_VARIANTS) and "config tiny-sdxl" in stdout
    ref = cells[SDXL_RECIPE]
    assert ref["optimizer"] == "AdamW8bit" and ref["cached"] and ref["trainable_params"] < 200_000
    for row in table(stdout):
        r = cells[row[0]]
        assert (row[1], row[3], row[7]) == (f"{r['median_s']:.4g}", peak_text(r),
                                            f"{r['median_s'] / ref['median_s']:.2f}, "
                                            f"{r['peak_bytes'] / ref['peak_bytes']:.2f}"), row[0]
    lean = cells[SDXL_RECIPE + "+fused+bf16w"]
    assert lean["weights_dtype"] == "bfloat16" and math.isclose(lean["first_loss"], ref["first_loss"], rel_tol=1e-2)


# ---- FLUX.1 ------------------------------------------------------------------------------------------------------
TINY_FLUX_FT = REPO / "configs/flux/tiny-flux-finetune.yaml"
#: The first-step loss of the rows whose frozen weights (or text encoders) are stored in bf16 or float8, relative to
#: the fp32 recipe's. Measured on the tiny model (2 torch threads and 1, 2-core AMD EPYC): bf16 2.6e-4, fp8 8.7e-4,
#: fp8t5 4.1e-5; held to 5e-3 (five times the largest).
FLUX_ROUNDING = 5e-3


def flux_cells(run: tuple[str, dict]) -> tuple[dict, dict]:
    results = run[1]["results"]
    return ({r["variant"]: r for r in results if "impl" not in r},
            {r["variant"]: r for r in results if r.get("impl") == "diffusers"})


def tiny_flux_counts() -> dict[str, int]:
    """From the tiny FLUX model itself (built from its config, weights irrelevant) and diffusers' transformer of the
    same config: the elements and count of the transformer's and the text encoders' ``nn.Linear`` weights (what
    float8 stores in one byte plus a 4-byte scale each), the frozen parts' integer buffers (which no dtype switch
    touches) and the transformer's parameters by diffusers' count."""
    import torch
    from diffusers import FluxTransformer2DModel
    from ldm.families.flux.diffusers import transformer_config
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(TINY_FLUX_FT)
    model = instantiate_from_config(config.model)

    def linears(module: torch.nn.Module) -> list[torch.Tensor]:
        return [m.weight for m in module.modules() if type(m) is torch.nn.Linear]
    text = [w for e in model.conditioner.embedders for w in linears(e)]
    net = linears(model.model.diffusion_model)
    frozen = [model.first_stage_model, model.conditioner, model.model.diffusion_model]
    with torch.device("meta"):
        theirs = FluxTransformer2DModel(**transformer_config(OmegaConf.to_container(config.model.params)))
    return {"net_linear": sum(w.numel() for w in net), "net_layers": len(net),
            "text_linear": sum(w.numel() for w in text), "text_layers": len(text),
            "int_buffers": sum(b.numel() * b.element_size() for m in frozen for b in m.buffers()
                               if not b.is_floating_point()),
            "transformer": sum(p.numel() for p in theirs.parameters())}


def test_flux_rows_run_and_the_table_agrees_with_json(flux_dreambooth_run: tuple[str, dict]) -> None:
    """--variants all on tiny-flux: every row ran in its own process, in flux_variants' order, against the recipe;
    the table shows the JSON's numbers (frozen weights and first loss included); the block-swap row says that on a
    CPU nothing was swapped, and nothing was."""
    from benchmarks.dreambooth_flux import FLUX_RECIPE, flux_variants
    stdout, data = flux_dreambooth_run
    ours, _ = flux_cells(flux_dreambooth_run)
    assert list(ours) == list(flux_variants(OmegaConf.load(TINY_FLUX_FT)))
    assert list(ours)[5] == FLUX_RECIPE + "+swap3" and list(ours)[-1] == "unet+ckpt+8bit"
    assert data["complete"] and "config tiny-flux" in stdout and "64 px" in stdout
    ref = ours[FLUX_RECIPE]
    rows = table(stdout.split("\n\n")[0])  # our table; the peer's follows
    assert [row[0].split(" (")[0] for row in rows] == list(ours)
    for row in rows:
        r = ours[row[0].split(" (")[0]]
        assert row[1:] == [f"{r['median_s']:.4g}", f"{1 / r['median_s']:.3g}", peak_text(r),
                           fmt_bytes(r["model_bytes"]), fmt_bytes(r["frozen_bytes"]), fmt_count(r["trainable_params"]),
                           fmt_bytes(r["optimizer_state_bytes"]), f"{r['first_loss']:.6g}",
                           f"{r['median_s'] / ref['median_s']:.2f}, {r['peak_bytes'] / ref['peak_bytes']:.2f}"], row[0]
    swap = ours[FLUX_RECIPE + "+swap3"]
    assert (swap["blocks_to_swap"], swap["swapped_blocks"]) == (3, 0)
    assert rows[5][0] == FLUX_RECIPE + "+swap3 (no accelerator: nothing swapped)"
    assert all(r["optimizer"] == "AdamW8bit" and len(r["seconds"]) == 1 for r in ours.values())
    assert len({r["pid"] for r in data["results"]}) == len(data["results"]) == len(ours) + 1


def test_flux_memory_switches_change_memory_not_the_loss(flux_dreambooth_run: tuple[str, dict]) -> None:
    """The same seeded weights and draws in every row. Block swap (which moves nothing on a CPU) and the full
    fine-tune (zero-initialised adapters leave the function as it is) start from the recipe's loss bit for bit,
    cached latents and T5/CLIP outputs to float rounding; bf16 and float8 storage move it within ``FLUX_ROUNDING``,
    and do move it. What they save, in bytes of frozen weights, is the closed form of their formats: bf16 halves
    every floating tensor; fp8 stores each of the transformer's linear weights in 1 byte (from bf16's 2) plus a
    4-byte scale, fp8t5 each of the text encoders' (from fp32's 4)."""
    from benchmarks.dreambooth_flux import FLUX_RECIPE as R
    ours, _ = flux_cells(flux_dreambooth_run)
    loss = {v: r["first_loss"] for v, r in ours.items()}
    assert loss[R + "+swap3"] == loss["unet+ckpt+8bit"] == loss[R] and 0 < loss[R] < float("inf")
    assert math.isclose(loss[R + "+cached"], loss[R], rel_tol=1e-6) and ours[R + "+cached"]["cached"]
    for switch in ("bf16", "fp8", "fp8t5"):
        assert math.isclose(loss[f"{R}+{switch}"], loss[R], rel_tol=FLUX_ROUNDING) and loss[f"{R}+{switch}"] != loss[R]
    assert [ours[R + "+" + s]["mixed"] for s in ("bf16", "fp8", "fp8t5")] == ["bf16", "bf16", None]
    n = tiny_flux_counts()
    frozen = {v: r["frozen_bytes"] for v, r in ours.items()}
    assert frozen[R + "+bf16"] == (frozen[R] - n["int_buffers"]) // 2 + n["int_buffers"]
    assert frozen[R + "+fp8"] == frozen[R + "+bf16"] - n["net_linear"] + 4 * n["net_layers"]
    assert frozen[R + "+fp8t5"] == frozen[R] - 3 * n["text_linear"] + 4 * n["text_layers"]
    assert frozen[R + "+cached"] == frozen[R + "+swap3"] == frozen[R] > frozen["unet+ckpt+8bit"]
    assert [ours[R + "+" + s]["frozen_dtype"] for s in ("bf16", "fp8", "fp8t5")] == ["bf16", "fp8", "fp32"]


def test_flux_trainable_parameters_match_closed_forms(flux_dreambooth_run: tuple[str, dict]) -> None:
    """Rank r = 16 at width w = 64, D = 2 double and S = 2 single blocks. Ours (sd-scripts' targets): per double
    block both streams' qkv (w -> 3w), proj (w -> w), mlp.0 (w -> 4w) and mlp.2 (4w -> w), r (in + out) each, 32 r w;
    per single block linear1 (w -> 7w) and linear2 (5w -> w), 14 r w. diffusers' script (its default targets): per
    double block 8 attention projections (w -> w) and 4 feed-forward layers (w <-> 4w), 36 r w; per single block
    to_q, to_k, to_v, 6 r w. The full fine-tune trains what diffusers' FluxTransformer2DModel of the config has."""
    from benchmarks.dreambooth_flux import FLUX_RECIPE
    ours, peer = flux_cells(flux_dreambooth_run)
    r, w, d, s = 16, 64, 2, 2
    for name, row in ours.items():
        expected = ((r * w * (32 * d + 14 * s), 2 * (8 * d + 2 * s)) if name.startswith("lora16") else
                    (tiny_flux_counts()["transformer"], row["trainable_tensors"]))
        assert (row["trainable_params"], row["trainable_tensors"]) == expected, name
    assert (peer[FLUX_RECIPE]["trainable_params"], peer[FLUX_RECIPE]["trainable_tensors"]) == (
        r * w * (36 * d + 6 * s), 2 * (12 * d + 3 * s))


def test_flux_peer_step_computes_our_loss(flux_dreambooth_run: tuple[str, dict]) -> None:
    """diffusers' train_dreambooth_lora_flux.py step (its FluxTransformer2DModel with peft LoRA, AutoencoderKL,
    CLIPTextModel, T5EncoderModel, holding our weights), in its own process, computes the loss ours does from the
    same latents, noise, t and text embeddings (the same seeded draws; the text encoded by transformers' models and
    tokenizers), to 1e-5; the table sets the two steps side by side."""
    from benchmarks.dreambooth_flux import FLUX_RECIPE
    stdout, _ = flux_dreambooth_run
    ours, peer = flux_cells(flux_dreambooth_run)
    assert list(peer) == [FLUX_RECIPE]
    o, d = ours[FLUX_RECIPE], peer[FLUX_RECIPE]
    assert math.isclose(d["first_loss"], o["first_loss"], rel_tol=1e-5)
    assert d["optimizer"] == "AdamW8bit" and d["weights_dtype"] == "float32" and not d["cached"]
    # Every row whose options the script has beside it: the recipe, and the rows whose switch it lacks.
    body = [row for row in table(stdout) if "(peer: " in row[0]]
    assert [row[0] for row in body] == [f"{v} (peer: {FLUX_RECIPE})" for v in (FLUX_RECIPE, FLUX_RECIPE + "+fp8t5",
                                                                               FLUX_RECIPE + "+swap3")]
    assert body[0][1:] == [f"{o['median_s']:.4g}", f"{d['median_s']:.4g}", f"{o['median_s'] / d['median_s']:.2f}",
                           peak_text(o), peak_text(d), f"{o['peak_bytes'] / d['peak_bytes']:.2f}",
                           f"{(o['peak_bytes'] - o['model_bytes']) / (d['peak_bytes'] - d['model_bytes']):.2f}"]
    assert "train_dreambooth_lora_flux.py" in stdout


def test_flux_peer_sigma_is_the_schedulers_at_its_timestep() -> None:
    """The peer takes sigma = t and timestep = 1000 t: on the FlowMatchEulerDiscreteScheduler of FLUX.1-dev's release
    (dynamic shifting, so its training table is unshifted), the sigma the script looks up at each timestep is
    exactly timestep / 1000."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from ldm.export.diffusers import model_params
    from ldm.families.flux.diffusers import flow_scheduler_config
    params = model_params(OmegaConf.load(REPO / "configs/flux/flux1-dev-dreambooth-lora.yaml"))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(flow_scheduler_config(params))
    assert scheduler.config.use_dynamic_shifting and scheduler.config.num_train_timesteps == 1000
    assert len(scheduler.timesteps) == 1000 and torch.equal(scheduler.sigmas, scheduler.timesteps / 1000)


# ---- the harness -------------------------------------------------------------------------------------------------
def test_every_cell_ran_in_a_fresh_process(unet_run: tuple[str, dict], dreambooth_run: tuple[str, dict]) -> None:
    pids = [r["pid"] for run in (unet_run, dreambooth_run) for r in run[1]["results"]]
    assert len(set(pids)) == len(pids) == 2 * len(UNET_ROWS) + len(VARIANTS) and os.getpid() not in pids


def test_fork_and_new_interpreters_measure_the_same_step(dreambooth_run: tuple[str, dict],
                                                        peer_run: tuple[str, dict]) -> None:
    """The row "full" forked from the zygote (dreambooth_run) and in a new interpreter (peer_run): the same loss
    bit for bit, parameters and optimizer state; the fork's memory after building is no more than the new
    interpreter's (shared libraries count only the pages the cell touches), and both ran in processes of their
    own."""
    forked = next(r for r in dreambooth_run[1]["results"] if r["variant"] == "full")
    new = next(r for r in peer_run[1]["results"] if r["variant"] == "full" and "impl" not in r)
    for key in ("first_loss", "trainable_params", "trainable_tensors", "optimizer_state_bytes"):
        assert forked[key] == new[key], key
    assert 0 < forked["model_bytes"] <= new["model_bytes"] and forked["pid"] != new["pid"]


@pytest.mark.parametrize("fork", [False, True])
def test_a_failing_cell_is_reported(tmp_path: Path, fork: bool) -> None:
    """A worker that raises gives a "failed" row, its exception in the output and the JSON, and exit status 1,
    in a new interpreter as in a forked one."""
    config = tmp_path / "no-unet.yaml"
    config.write_text("model:\n  params:\n    image_size: 8\n")
    proc, data = run_benchmark("--config", str(config), "--only", "forward", "--impl", "ours", "--markdown",
                               "--threads", "1", *(["--fork"] if fork else []), json_path=tmp_path / "out.json",
                               timeout=300)
    assert proc.returncode == 1
    assert table(proc.stdout)[0][:3] == ["UNet forward (s/call)", "failed", "-"]
    [result] = data["results"]
    assert "KeyError" in result["error"] and "unet_config" in result["error"] and data["complete"]
    assert result["error"] in proc.stdout


def test_rounds_alternate_the_order_and_pool_the_timings(tmp_path: Path) -> None:
    """``--rounds 2``: each cell in two workers, started A B, then B A; a cell's time is the median of all its
    timed calls and its peak the largest of its workers'."""
    import statistics
    proc, data = run_benchmark("--only", "forward", "--latent", "8", "--batch", "1", "--repeat", "2", "--warmup",
                               "0", "--threads", "1", "--rounds", "2", "--fork", json_path=tmp_path / "out.json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    started = [line.split()[2] for line in proc.stderr.splitlines() if line.startswith("[benchmark] unet:")]
    assert started == ["ours", "diffusers", "diffusers", "ours"]
    for r in data["results"]:
        assert r["rounds"] == 2 and len(r["seconds"]) == 4 and r["median_s"] == statistics.median(r["seconds"])
        assert len(r["round_medians"]) == 2 and min(r["round_medians"]) <= r["median_s"] <= max(r["round_medians"])
    assert "median of 2 rounds x 2" in proc.stdout


def test_compiled_training_step_keeps_the_loss(tmp_path: Path) -> None:
    """``--only train_compile``: ours compiled (what ``compile: true`` runs) computes the loss diffusers' eager
    UNet does on the same weights and inputs."""
    proc, data = run_benchmark("--only", "train_compile", "--latent", "8", "--batch", "1", "--repeat", "1",
                               "--warmup", "1", "--threads", "1", "--fork", json_path=tmp_path / "out.json",
                               timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    by = {r["impl"]: r for r in data["results"]}
    assert by["ours"]["compiled"] and not by["diffusers"]["compiled"]
    assert math.isclose(by["ours"]["first_output"], by["diffusers"]["first_output"], rel_tol=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--only", "forward,backward"], "unknown --only/--impl entries: ['backward']"),
    (["--suite", "dreambooth", "--variants", "full,half"], "--variants: unknown ['half']"),
    (["--suite", "dreambooth", "--latent", "8"], "unrecognized arguments: --latent 8"),  # a unet suite flag
    (["--config", "nowhere.yaml"], "--config: 'nowhere.yaml' is neither tiny, v1, tiny-sdxl, sdxl nor an existing file"),
    (["--suite", "dreambooth", "--config", "tiny-sdxl", "--peer", "diffusers"], "SDXL has none"),
    (["--suite", "dreambooth", "--config", "tiny-sdxl", "--variants", "full+ckpt"], "SDXL's text encoders are frozen"),
    (["--suite", "dreambooth", "--config", "tiny-flux", "--variants", "full+ckpt"],
     "FLUX.1's text encoders are frozen"),
    (["--suite", "dreambooth", "--config", "tiny-flux", "--variants", "lora4+ckpt+swap4"],
     "at most 3 of the transformer's 4 blocks"),
    (["--suite", "dreambooth", "--variants", "lora4+ckpt+swap2"], "this network is a UNet"),
    (["--suite", "dreambooth", "--config", "tiny-flux", "--variants", "lora4+bf16+fp8"], "unknown ['lora4+bf16+fp8']"),
    (["--suite", "dreambooth", "--width", "256"], "--width: narrows FLUX.1's transformer"),
])
def test_bad_selections_are_refused_before_any_worker(flags: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert proc.returncode != 0 and message in proc.stderr
    assert "[benchmark]" not in proc.stderr  # no cell was started


def test_gpu_benchmark_script_stops_at_once_without_cuda() -> None:
    """scripts/gpu_benchmark.sh is valid bash, and on a machine without CUDA says so in one line, running nothing."""
    import torch
    script = REPO / "scripts/gpu_benchmark.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable, OUT=str(REPO / "no-such-output")))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "gpu_benchmark.sh: needs a CUDA GPU and a CUDA build of torch (torch.cuda.is_available() is False here); "
        "nothing was run"]
    assert not (REPO / "no-such-output").exists()


def test_gpu_benchmark_script_asks_only_for_rows_the_suite_accepts(tmp_path: Path) -> None:
    """Every benchmark call of scripts/gpu_benchmark.sh (run here with a stand-in python that says CUDA is there and
    records each call) names a config and rows that the suite's own selection accepts: a row it would refuse on
    the GPU (an unknown switch, more blocks swapped than FLUX.1 has, a frozen text encoder trained) fails here."""
    from benchmarks.cli import SUITES, parse_args
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\n[ "$1" = scripts/benchmark.py ] && printf "%s\\0" "$@" >> {calls} '
                    f'&& printf "\\n" >> {calls}\nexit 0\n')
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(REPO / "scripts/gpu_benchmark.sh")], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "out")))
    assert proc.returncode == 0, proc.stderr
    argvs = [line.strip("\0").split("\0")[1:] for line in calls.read_text().splitlines() if line]
    configs = [argv[argv.index("--config") + 1] for argv in argvs]
    assert configs == ["v1", "v1", "sdxl", "sdxl", "flux-dev", "flux-dev"]
    for argv in argvs:
        args = parse_args(argv)
        cells = SUITES[args.suite].cells(args)
        assert [c["variant"] for c in cells] == args.variants.split(","), argv
    bad = subprocess.run(["bash", str(REPO / "scripts/gpu_benchmark.sh"), "sdx"], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "out")))
    assert bad.returncode == 2 and "part 'sdx' is none of sd, flux, all" in bad.stderr
