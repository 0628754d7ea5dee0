"""Lean training (README: "Training on small GPUs"): fused backward, bf16-stored weights with stochastic
rounding, compile and channels-last, DeepSpeed's offload refused where it cannot run; all on the tiny fine-tuning config.

Fused backward is held to the plain Lightning loop it replaces (same weights, bit for bit, after the same steps;
an interrupted and resumed run to an uninterrupted one); stochastic rounding to closed-form expectations; a
bf16-weights run to the fp32 run's loss on a fixed grid of timesteps and noises.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, load_config
from test_train import TINY_FT, assert_same_weights, bad_run, base_args, final_weights, fixed_subject_loss, \
    metrics, run_folder

import main as main_module
from ldm.config import ConfigError
from ldm.optim.rounding import stochastic_round_bf16
from ldm.training.config import check_training_config

FUSED = "model.params.optimizer_config.fused_backward=true"
BF16 = "model.params.weights_dtype=bf16"


def train(tmp_path: Path, steps: int, *extra: str) -> dict[str, torch.Tensor]:
    assert main_module.main(base_args(tmp_path, "--max_steps", str(steps), *extra)) == 0
    return final_weights(run_folder(tmp_path))


# ---- stochastic rounding -------------------------------------------------------------------------------------

def test_stochastic_rounding_is_unbiased_where_round_to_nearest_is_not():
    """x = 1 + gap/4 lies between the bf16 neighbours 1 and 1 + gap (gap = 2**-7 at 1): round-to-nearest always
    gives 1 (bias -gap/4); stochastic rounding gives 1 + gap with probability 1/4, so its mean is x. Negative
    values mirror it."""
    gap = 2.0 ** -7
    x = torch.tensor([1 + gap / 4, -(1 + gap / 4), 3 + 0.7 * 2 * gap], dtype=torch.float32)  # gap 2**-6 at 3
    n = 1 << 16
    rounded = stochastic_round_bf16(x.repeat(n, 1), torch.Generator().manual_seed(0)).float()
    assert torch.equal(x.to(torch.bfloat16).float(), torch.tensor([1.0, -1.0, 3 + 2 * 2 * gap / 2]))  # nearest
    lower = torch.tensor([1.0, -1.0, 3.0])
    upper = torch.tensor([1 + gap, -(1 + gap), 3 + 2 * gap])
    assert ((rounded == lower) | (rounded == upper)).all()  # always one of the two neighbours
    p = torch.tensor([0.25, 0.25, 0.7])
    stderr = (upper - lower).abs() * (p * (1 - p) / n).sqrt()
    assert ((rounded.mean(0) - x).abs() < 4 * stderr).all(), (rounded.mean(0) - x, stderr)
    assert ((x.to(torch.bfloat16).float() - x).abs()[:2] > 40 * stderr[:2]).all()  # nearest is far off


def test_stochastic_rounding_is_deterministic_per_seed_and_exact_on_bf16_values():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    a, b = (stochastic_round_bf16(x, torch.Generator().manual_seed(5)) for _ in range(2))
    c = stochastic_round_bf16(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    exact = x.to(torch.bfloat16).float()  # already representable: nothing to round
    assert torch.equal(stochastic_round_bf16(exact, torch.Generator().manual_seed(5)).float(), exact)
    special = torch.tensor([float("inf"), -float("inf"), 0.0])
    assert torch.equal(stochastic_round_bf16(special, torch.Generator()).float(), special)
    assert stochastic_round_bf16(torch.tensor([float("nan")]), torch.Generator()).isnan().all()


# ---- fused backward --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_fused_backward_gives_the_plain_loops_weights(tmp_path, optimizer):
    """Same seed, 5 steps: fused backward (manual optimization, updates in the gradient hooks) ends with the very
    weights of Lightning's automatic loop, with the same step count and logged learning rates. For AdamW8bit,
    whose per-tensor update is also independent of the other tensors, that holds bit for bit too (well within
    the 8-bit quantisation)."""
    name = f"model.params.optimizer_config.name={optimizer}"
    logs = "lightning.trainer.log_every_n_steps=1"
    plain = train(tmp_path / "plain", 5, name, logs, "model.params.lr_warmup_steps=3")
    fused = train(tmp_path / "fused", 5, name, logs, "model.params.lr_warmup_steps=3", FUSED)
    assert_same_weights(plain, fused)
    ckpts = [torch.load(run_folder(tmp_path / k) / "checkpoints" / "last.ckpt", weights_only=True)
             for k in ("plain", "fused")]
    assert ckpts[0]["global_step"] == ckpts[1]["global_step"] == 5
    assert len(ckpts[1]["optimizer_states"][0]["inner"]) == len(ckpts[0]["optimizer_states"][0]["state"])
    lrs = [[float(r["lr"]) for r in metrics(run_folder(tmp_path / k)) if r.get("lr")] for k in ("plain", "fused")]
    assert lrs[0] == lrs[1] and lrs[0][:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # the warm-up, as logged


def test_fused_backward_frees_each_gradient_during_backward(tiny_model):
    """After backward no parameter holds a gradient (each was freed in its hook), and every weight moved."""
    from ldm.optim.build import build_optimizer
    model = copy.deepcopy(tiny_model).train()
    params = [p for p in model.model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = build_optimizer(params, 1e-3, {"fused_backward": True})
    before = [p.detach().clone() for p in params]
    seen = []
    params[0].register_post_accumulate_grad_hook(lambda p: seen.append(sum(q.grad is not None for q in params)))
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    model.apply_model(x, t, c).square().mean().backward()
    assert all(p.grad is None for p in params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    assert seen and seen[0] < len(params)  # while backward ran, not all gradients existed at once
    opt.remove_hooks()


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_updating_a_large_tensor_in_chunks_is_one_update(optimizer, dtype):
    """A tensor larger than the chunk is updated span by span, each span with its own state (what bounds an
    update's temporary memory): after several steps the weights and moments are the same, bit for bit, as with
    one update of the whole tensor, for AdamW and for AdamW8bit (blocks of 256, which chunks are a multiple of;
    chunks of at least its 4096-element minimum for 8-bit state), with fp32 weights and with bf16 weights (the
    same rounding noise, drawn span by span); the remainder of 300 elements is not left as a span of its own
    (under AdamW8bit's 4096-element minimum it would get 32-bit state). The state saved by the chunked optimizer
    loads into another chunked one and continues alike."""
    from ldm.optim.build import ADAMW_DEFAULTS, optimizer_class
    from ldm.optim.per_tensor import PerTensorOptimizer

    cls = optimizer_class(optimizer)
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(5 * 4096 + 300, generator=gen).view(-1, 4)  # 20780 elements
    grads = [torch.randn(init.shape, generator=gen) for _ in range(4)]

    def run(chunk, steps, opt_state=None, start=None):
        p = torch.nn.Parameter((init if start is None else start).clone().to(dtype))
        opt = PerTensorOptimizer([p], 1e-2, lambda spans: cls(spans, lr=1e-2, **ADAMW_DEFAULTS), fused=False,
                                 seed=3, chunk=chunk)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        for g in steps:
            p.grad = g.to(dtype)
            opt.step()
        return p.detach().clone(), opt

    whole, whole_opt = run(1 << 20, grads)
    chunked, chunked_opt = run(4096, grads)
    assert len(chunked_opt.spans[0]) == 5 and chunked_opt.spans[0][-1] == (4 * 4096, init.numel())
    assert torch.equal(whole, chunked) and not torch.equal(whole.float(), init)
    (whole_state,) = whole_opt.inner_state()
    for key in ("exp_avg", "exp_avg_sq") if optimizer == "adamw" else ("state1", "state2"):
        chunked_moment = torch.cat([state[key].reshape(-1) for state in chunked_opt.inner_state()])
        assert torch.equal(chunked_moment, whole_state[key].reshape(-1)), key
    # Two steps, saved, then two more in a fresh optimizer: the same as four in one.
    first, first_opt = run(4096, grads[:2])
    resumed, _ = run(4096, grads[2:], opt_state=copy.deepcopy(first_opt.state_dict()), start=first.float())
    assert torch.equal(resumed, chunked)
    with pytest.raises(ValueError, match="chunk"):
        run(1 << 20, [], opt_state=first_opt.state_dict())


def test_fused_backward_resumes_exactly(tmp_path):
    """Ctrl-C at step 4 of a fused run, then -r: the same weights as the fused run that was never stopped (the
    inner optimizers' moments and step counts are saved and restored)."""
    straight = train(tmp_path / "straight", 9, FUSED)
    args = base_args(tmp_path / "stopped", "--max_steps", "9", FUSED, "--allow_any_target",
                     "lightning.callbacks.interrupt.target=helpers.InterruptAt",
                     "lightning.callbacks.interrupt.params.step=4")
    with pytest.raises(SystemExit):
        main_module.main(args)
    run = run_folder(tmp_path / "stopped")
    stopped = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == 4 and stopped["optimizer_states"][0]["steps"] == 4
    assert main_module.main(["-r", str(run), "--allow_any_target",
                             "lightning.callbacks.interrupt.params.step=1000"]) == 0
    resumed = final_weights(run)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    assert_same_weights(resumed, straight)


@pytest.mark.parametrize("override, why", [
    ("lightning.trainer.accumulate_grad_batches=2", "gradients cannot be summed over batches"),
    ("lightning.trainer.gradient_clip_val=1.0", "needs every gradient before the first update"),
    ("lightning.trainer.precision=16-mixed", "GradScaler must see every gradient"),
    ("lightning.trainer.strategy=deepspeed_stage_2_offload", "DeepSpeed runs its own optimizer step"),
])
def test_fused_backward_refuses_what_needs_all_gradients_first(tmp_path, capsys, override, why):
    config = OmegaConf.merge(load_config(TINY_FT), OmegaConf.from_dotlist([FUSED, override]))
    with pytest.raises(ConfigError, match=why):
        check_training_config(config)
    line = bad_run(tmp_path, capsys, *base_args(tmp_path, "--max_steps", "2", FUSED, override))
    assert "fused_backward" in line and why in line


def test_fused_backward_refused_on_two_devices(capsys):
    from ldm.training.run import trainer_devices
    config = OmegaConf.merge(load_config(TINY_FT), OmegaConf.from_dotlist(
        [FUSED, "lightning.trainer.accelerator=cpu", "lightning.trainer.devices=2"]))
    with pytest.raises(ConfigError, match="before DDP has averaged its gradient"):
        trainer_devices(config, [])


# ---- bf16 weights ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_and_bf16_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("bf16")
    runs = []
    for name, extra in (("fp32", ()), ("bf16", (BF16, FUSED))):
        assert main_module.main(base_args(tmp / name, "--max_steps", "30", *extra)) == 0
        runs.append(run_folder(tmp / name))
    return tmp, *runs


def test_bf16_weights_lower_the_subject_loss_as_fp32_does(fp32_and_bf16_runs):
    """30 steps, loaded into the normal (fp32) model from the checkpoint: on a fixed grid of timesteps and noises
    the bf16-weights run (fused, stochastic rounding) brings the subject loss down as far as the fp32 run,
    within a few per cent of the starting loss."""
    from ldm.data.dreambooth import DreamBoothDataset
    from ldm.util import instantiate_from_config
    from ldm.weights.load import load_model_from_config
    tmp, fp32_run, bf16_run = fp32_and_bf16_runs
    ds = DreamBoothDataset(tmp / "fp32" / "subject", "sks", "toy", size=64, repeats=1, flip_p=0)
    images = torch.stack([ds[i]["image"] for i in range(4)])
    captions = [ds[i]["caption"] for i in range(4)]
    config = load_config(TINY_FT)
    __import__("pytorch_lightning").seed_everything(23)
    before = fixed_subject_loss(instantiate_from_config(config.model).eval(), images, captions)
    after = {name: fixed_subject_loss(load_model_from_config(config, run / "checkpoints" / "last.ckpt"),
                                      images, captions) for name, run in (("fp32", fp32_run), ("bf16", bf16_run))}
    assert after["fp32"] < 0.7 * before and after["bf16"] < 0.7 * before, (before, after)
    assert abs(after["bf16"] - after["fp32"]) < 0.05 * before, (before, after)


def test_bf16_weights_checkpoint_has_the_fp32_layout(fp32_and_bf16_runs):
    _, fp32_run, bf16_run = fp32_and_bf16_runs
    a, b = final_weights(fp32_run), final_weights(bf16_run)
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    unet = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(b[unet], b[unet].bfloat16().float())  # trained in bf16: every value is a bf16 number
    state = torch.load(bf16_run / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]
    moments = [v for s in state["inner"] for v in s["state"][0].values() if v.ndim > 0]
    assert moments and all(v.dtype == torch.float32 for v in moments)  # fp32 optimizer state


def test_bf16_weights_fused_and_plain_agree_and_repeat(tmp_path):
    """The rounding seeds come from (seed, step, tensor): the plain loop and fused backward round alike."""
    plain = train(tmp_path / "plain", 3, BF16)
    fused = train(tmp_path / "fused", 3, BF16, FUSED)
    assert_same_weights(plain, fused)


def test_bf16_weights_refuse_fp16_precision():
    config = OmegaConf.merge(load_config(TINY_FT), OmegaConf.from_dotlist(
        [BF16, "lightning.trainer.precision=16-mixed"]))
    with pytest.raises(ConfigError, match="weights_dtype=bf16 with lightning.trainer.precision=16-mixed"):
        check_training_config(config)


# ---- compile, channels-last ------------------------------------------------------------------------------------

def one_loss(model, **switches) -> float:
    model = copy.deepcopy(model).train()
    model.first_stage_key, model.cond_stage_key = "image", "caption"
    for k, v in switches.items():
        setattr(model, k, v)
    model.configure_model()
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, "caption": ["a sks toy"],
             "reg_image": torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, "reg_caption": ["a toy"]}
    loss, _ = model.shared_step(batch, torch.Generator().manual_seed(1))
    loss.backward()
    return float(loss.detach())


def test_channels_last_gives_the_same_loss(tiny_model):
    assert one_loss(tiny_model, channels_last=True) == pytest.approx(one_loss(tiny_model), rel=1e-5)


def test_compile_falls_back_to_eager_with_one_line_without_a_compiler(tmp_path):
    """No C++ compiler (CXX points nowhere): the run says so in one line and trains in eager mode."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), OMP_NUM_THREADS="1",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    script = ("import sys, torch; sys.path[:0] = ['tests', '.']; torch.set_num_threads(1)\n"
              "from conftest import load_config\nfrom ldm.util import instantiate_from_config\n"
              "m = instantiate_from_config(load_config().model); m.compile_unet = True; m.configure_model()\n"
              "print('compiled' if hasattr(m.model.diffusion_model, '_compiled_call_impl') and "
              "m.model.diffusion_model._compiled_call_impl is not None else 'eager')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("model.params.compile")]
    assert len(lines) == 1 and "eager mode" in lines[0], proc.stdout
    assert proc.stdout.strip().endswith("eager")


# ---- DeepSpeed -------------------------------------------------------------------------------------------------

def test_deepspeed_offload_on_a_cpu_machine_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = bad_run(tmp_path, capsys, *base_args(tmp_path, "--max_steps", "2",
                                                "lightning.trainer.strategy=deepspeed_stage_2_offload"))
    assert "lightning.trainer.strategy=deepspeed_stage_2_offload needs a CUDA GPU" in line, line


def test_deepspeed_offload_refuses_8bit_adam():
    config = OmegaConf.merge(load_config(TINY_FT), OmegaConf.from_dotlist(
        ["lightning.trainer.strategy=deepspeed_stage_2_offload", "model.params.optimizer_config.name=adamw8bit"]))
    with pytest.raises(ConfigError, match="DeepSpeed's CPU AdamW"):
        check_training_config(config)


def test_deepspeed_offload_optimizer_is_adamw(monkeypatch):
    """What ZeRO-Offload steps on the CPU (DeepSpeedCPUAdam in AdamW mode, as build_optimizer makes it for an
    offloading strategy) updates as torch's AdamW does. Its C++ op is compiled once per environment, into the
    environment (scripts/install.sh does it; minutes on first use otherwise)."""
    from ldm.optim.build import build_optimizer
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    g = torch.Generator().manual_seed(0)
    start, grads = torch.randn(300, generator=g), [torch.randn(300, generator=g) for _ in range(3)]
    weights = []
    for offload in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = build_optimizer([p], 1e-2, {"weight_decay": 0.01}, cpu_offload=offload)
        assert type(opt).__name__ == ("DeepSpeedCPUAdam" if offload else "AdamW")
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        weights.append(p.detach())
    assert torch.allclose(weights[0], weights[1], atol=1e-6)
    if sys.prefix != sys.base_prefix:  # a virtual environment (as scripts/install.sh makes): the op was built there
        assert list((Path(sys.prefix) / "torch_extensions").glob("cpu_adam/cpu_adam.so"))


def test_compile_compiles_the_unet_in_place(tiny_model):
    """With a C++ compiler, model.params.compile compiles the UNet in place: the checkpoint keys keep their names.
    That the compiled training step computes the eager loss is tested once, against diffusers' eager UNet, by
    tests/test_benchmark.py::test_compiled_training_step_keeps_the_loss (compiling the tiny UNet's forward and
    backward takes minutes on 2 CPU cores the first time)."""
    compiled = copy.deepcopy(tiny_model)
    compiled.compile_unet = True
    compiled.configure_model()
    assert compiled.model.diffusion_model._compiled_call_impl is not None
    assert tiny_model.model.diffusion_model._compiled_call_impl is None
    assert compiled.state_dict().keys() == tiny_model.state_dict().keys()


def folder_state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("switch, why", [(FUSED, "resume with the same settings"),
                                         ("--lora_rank=2", "saved without LoRA adapters and this run has lora_config")])
def test_a_refused_resume_leaves_the_run_folder_as_it_was(tmp_path, capsys, switch, why):
    """A plain run resumed with fused backward on would silently restart its AdamW moments, one with LoRA switched
    on would not fit its weights: one line each. Nothing is written into the run folder before the refusal (a
    config saved there would make every later plain ``-r`` load the refused switch), so ``-r`` then continues."""
    train(tmp_path, 2)
    run = run_folder(tmp_path)
    before = folder_state(run)
    with pytest.raises(SystemExit) as info:
        main_module.main(["-r", str(run), "--max_steps", "4", switch])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and why in err[0], err
    assert folder_state(run) == before
    assert main_module.main(["-r", str(run), "--max_steps", "4"]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


# ---- freed memory handed back after each CPU step -------------------------------------------------------------

HEAP_SCRIPT = """
import os, sys, torch
from ldm.util import release_freed_memory, return_large_frees_to_the_os
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
if sys.argv[1] == "trim":  # 64 KiB tensors live in glibc's heap; nine in ten freed leave holes between kept ones
    base = rss()
    blocks = [torch.ones(16384) for _ in range(4000)]
    kept = blocks[::10]
    del blocks
    freed = rss()
    assert release_freed_memory()
else:  # 8 MiB tensors between kept 1 MiB ones, after a 16 MiB one was freed (glibc then puts 8 MiB in its heap)
    if sys.argv[1] == "threshold":
        assert return_large_frees_to_the_os()
    big = torch.ones(4 << 20)  # 16 MiB
    del big
    base = rss()
    pairs = [(torch.ones(2 << 20), torch.ones(1 << 18)) for _ in range(40)]
    kept = [small for _, small in pairs]
    del pairs
    freed = rss()
print(base, freed, rss())
"""


def heap_after(case: str) -> tuple[int, int, int]:
    """RSS in a fresh process: before the allocations, after freeing most of them, and at the end."""
    out = subprocess.run([sys.executable, "-c", HEAP_SCRIPT, case], capture_output=True, text=True, cwd=REPO,
                         check=True)
    return tuple(int(v) for v in out.stdout.split())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim (elsewhere it is a no-op)")
def test_release_freed_memory_returns_what_the_heap_kept():
    """250 MiB in 64 KiB tensors, nine in ten freed: the freed space lies between kept blocks and stays
    resident; after ``release_freed_memory`` most of it is gone."""
    base, freed, released = heap_after("trim")
    assert freed - base > 200 * 2 ** 20, (base, freed, released)  # freeing alone gave nothing back
    assert freed - released > 150 * 2 ** 20, (base, freed, released)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (elsewhere it is a no-op)")
def test_large_tensors_go_back_to_the_os_when_freed():
    """320 MiB in 8 MiB tensors freed between kept 1 MiB ones (40 MiB): glibc alone keeps them resident (its
    threshold rose with an earlier 16 MiB free); with ``return_large_frees_to_the_os`` they are gone at once."""
    base, freed, _ = heap_after("default")
    assert freed - base > 250 * 2 ** 20, (base, freed)
    base, freed, _ = heap_after("threshold")
    assert freed - base < 100 * 2 ** 20, (base, freed)


def test_training_on_a_cpu_returns_freed_memory(tmp_path, monkeypatch):
    """The training run's callbacks set the threshold once and trim the heap once per optimisation step."""
    import ldm.training.callbacks
    calls = {"threshold": 0, "trim": 0}
    monkeypatch.setattr(ldm.training.callbacks, "return_large_frees_to_the_os",
                        lambda: calls.__setitem__("threshold", calls["threshold"] + 1) or True)
    monkeypatch.setattr(ldm.training.callbacks, "release_freed_memory",
                        lambda: calls.__setitem__("trim", calls["trim"] + 1) or True)
    train(tmp_path / "default", 3)
    assert calls == {"threshold": 1, "trim": 3}
    # a small model's run may keep its freed memory (configs/toy/autoencoder.yaml): no threshold, no trim
    train(tmp_path / "kept", 2, "lightning.release_freed_memory=false")
    assert calls == {"threshold": 1, "trim": 3}
