#!/usr/bin/env python
"""Time and peak memory: our SD v1 UNet beside diffusers' (``--suite unet``), or our DreamBooth training step in
its memory-saving variants (``--suite dreambooth``, in ``bench_dreambooth.py``).

    python scripts/benchmark.py                                   # tiny config, CPU, a few seconds per row
    python scripts/benchmark.py --config v1 --latent 32 --batch 1 --repeat 1 --warmup 1 --steps 2 --markdown
    python scripts/benchmark.py --config v1 --device cuda --dtype fp16 --latent 64 --batch 2 --steps 50
    python scripts/benchmark.py --suite dreambooth --config v1 --size 512 --repeat 1 --warmup 1 --markdown

The unet suite compares our UNet with diffusers' ``UNet2DConditionModel`` holding the same weights.

Rows: UNet forward (eval, no grad); one training step (noised latents, MSE to eps, backward, AdamW) without and
with gradient checkpointing; a classifier-free-guided DDIM loop, per image. Every (implementation, measurement)
runs in a fresh subprocess of this script, so each peak (CPU: peak RSS of that process; CUDA: peak allocated)
belongs to that one measurement; "+x" is the increment above the memory held right after building the model.
Ratios are ours / diffusers: below 1 means we are faster or leaner. Both suites share this harness: one fresh
worker process per cell (``--_worker``, a JSON line back on stdout), the memory readings, the table and ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": REPO / "configs/stable-diffusion/tiny-inference.yaml",
           "v1": REPO / "configs/stable-diffusion/v1-inference.yaml"}
SUITES = ("unet", "dreambooth")
MEASUREMENTS = ("forward", "train", "train_ckpt", "ddim")
IMPLS = ("ours", "diffusers")
DTYPES = ("fp32", "fp16", "bf16")
LABELS = {"forward": "UNet forward (s/call)", "train": "train step (s)",
          "train_ckpt": "train step, grad ckpt (s)", "ddim": "DDIM loop (s/image)"}
RESULT_TAG = "BENCHMARK_RESULT "
GUIDANCE_SCALE = 7.5
CONTEXT_TOKENS = 77  # CLIP's sequence length, what SD v1's cross-attention sees


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=SUITES, default="unet",
                   help="unet: our UNet vs diffusers'; dreambooth: our training step in its memory-saving variants")
    p.add_argument("--config", default="tiny",
                   help="tiny, v1, or a path: an inference YAML with a unet_config (unet suite), a fine-tuning "
                        "YAML (dreambooth suite: tiny/v1 name tiny-finetune.yaml / v1-finetune_unfrozen.yaml)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default). On a shared machine use fewer threads than "
                        "idle cores: an OpenMP team with a descheduled thread can run tens of times slower")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells run at once; more than 1 skews the timings and adds up the memory (smoke tests)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table instead of aligned text")
    p.add_argument("--json", type=Path, help="also write the raw numbers to this file")
    unet = p.add_argument_group("--suite unet")
    unet.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px for SD v1)")
    unet.add_argument("--batch", type=int, default=2, help="images per batch (DDIM runs 2x this through the UNet)")
    unet.add_argument("--dtype", choices=DTYPES, default="fp32",
                      help="fp16/bf16 run under autocast over fp32 master weights")
    unet.add_argument("--steps", type=int, default=10, help="DDIM steps of the sampling measurement")
    unet.add_argument("--only", default=",".join(MEASUREMENTS), help=f"comma-separated subset of {MEASUREMENTS}")
    unet.add_argument("--impl", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    db = p.add_argument_group("--suite dreambooth")
    db.add_argument("--size", type=int, default=None,
                    help="image side in px (default: the config's data.params.size: 64 tiny, 512 v1)")
    db.add_argument("--variants", default="all",
                    help="comma-separated subset of the variants (full, full+ckpt, ..., lora16+ckpt; see "
                         "scripts/bench_dreambooth.py), or all")
    # The cell a worker runs, its fields joined by ":" ("IMPL:MEASUREMENT" or "VARIANT"); it prints one JSON line.
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    return p


def resolve_config(name: str, configs: dict[str, Path] = CONFIGS) -> Path:
    """``tiny`` / ``v1`` name one of the repository's configs (inference ones by default); anything else is a path."""
    path = configs.get(name, Path(name))
    if not path.is_file():
        raise SystemExit(f"--config: {name!r} is neither tiny, v1 nor an existing file")
    return path


def load_model_params(config: Path) -> dict[str, Any]:
    """``model.params`` of an inference config as a plain dict (the UNet is ``unet_config.params``)."""
    from omegaconf import OmegaConf
    return OmegaConf.to_container(OmegaConf.load(config).model.params, resolve=True)


def diffusers_unet_config(unet: dict[str, Any]) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of the same network as our ``UNetModel(**unet)``.

    A level holds transformers when its downsampling factor 2**level is in ``attention_resolutions``, exactly as
    ``UNetModel.__init__`` decides; SD v1 configs give diffusers' standard SD v1 UNet. diffusers' SD1 naming
    calls the head *count* ``attention_head_dim``.
    """
    mults = list(unet["channel_mult"])
    attn = [2 ** level in unet["attention_resolutions"] for level in range(len(mults))]
    head_channels = unet.get("num_head_channels", -1)
    # With num_head_channels the head count grows with the width: diffusers takes it per level.
    heads = unet["num_heads"] if head_channels == -1 else tuple(unet["model_channels"] * m // head_channels
                                                                 for m in mults)
    return dict(
        # sample_size is only diffusers' default output side; it does not change the network.
        sample_size=unet.get("image_size", 64), in_channels=unet["in_channels"], out_channels=unet["out_channels"],
        block_out_channels=tuple(unet["model_channels"] * m for m in mults),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        layers_per_block=unet["num_res_blocks"], cross_attention_dim=unet["context_dim"],
        attention_head_dim=heads, transformer_layers_per_block=unet.get("transformer_depth", 1),
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)


def build_unet(impl: str, unet_params: dict[str, Any], seed: int = 0) -> Any:
    """Our UNet with seeded default init, or diffusers' UNet holding those very tensors (fp32, CPU).

    diffusers' model is created on the meta device and takes the converted tensors by assignment: the
    converter only renames keys, so the weights exist once and neither worker's peak counts a second copy.
    """
    import torch
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(seed)
    ours = UNetModel(**unet_params)
    if impl == "ours":
        return ours
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    config = diffusers_unet_config(unet_params)
    prefixed = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(prefixed, config), strict=True, assign=True)
    assert not any(t.is_meta for t in theirs.state_dict().values()), "a diffusers tensor was left unloaded"
    return theirs


class Meter:
    """What a worker reads off its device: memory held now, the peak, and timings of whole calls.

    CPU: the resident set of this process (Linux /proc) and its peak RSS, which covers the whole process, model
    building included. CUDA: allocated memory and its peak since ``model_built``; timings synchronise, so they
    measure the kernels rather than their launches.
    """

    def __init__(self, device: str) -> None:
        self.device = device

    def now(self) -> int:
        import torch
        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak(self) -> int:
        import resource
        import torch
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes

    def sync(self) -> None:
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()

    def model_built(self) -> int:
        """Call right after building the model: restarts the CUDA peak and returns the memory held now."""
        import torch
        self.sync()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return self.now()

    def time(self, fn: Callable[[], Any], warmup: int, repeat: int) -> list[float]:
        """Seconds of each of the ``repeat`` calls of ``fn`` that follow ``warmup`` untimed ones."""
        seconds = []
        for i in range(warmup + repeat):
            self.sync()
            tic = time.perf_counter()
            fn()
            self.sync()
            if i >= warmup:
                seconds.append(time.perf_counter() - tic)
        return seconds

    def device_name(self) -> str:
        import torch
        return torch.cuda.get_device_name() if self.device == "cuda" else cpu_name()


class Workload:
    """Inputs shared by every measurement, built once outside the timed region, and the UNet call itself.

    ``calls`` counts UNet evaluations, so the report can say when two DDIM loops did not make the same number.
    """

    def __init__(self, impl: str, unet: Any, model_params: dict[str, Any], args: argparse.Namespace) -> None:
        import torch
        from ldm.models.diffusion.schedule import make_beta_schedule, schedule_coefficients
        self.impl, self.unet, self.args, self.calls = impl, unet, args, 0
        self.device, B, L = torch.device(args.device), args.batch, args.latent
        self.start = model_params.get("linear_start", 0.00085)
        self.end = model_params.get("linear_end", 0.012)
        self.n_train = model_params.get("timesteps", 1000)
        betas = make_beta_schedule("linear", self.n_train, self.start, self.end)
        self.acp = torch.tensor(schedule_coefficients(betas)["alphas_cumprod"], dtype=torch.float32,
                                device=self.device)
        self.g = torch.Generator(device=self.device).manual_seed(1)
        unet_params = model_params["unet_config"]["params"]
        channels, ctx_dim = unet_params["in_channels"], unet_params["context_dim"]
        self.x0, self.noise = (torch.randn(B, channels, L, L, generator=self.g, device=self.device)
                               for _ in range(2))
        self.c, self.uc = (torch.randn(B, CONTEXT_TOKENS, ctx_dim, generator=self.g, device=self.device)
                           for _ in range(2))
        self.t = torch.randint(0, self.n_train, (B,), generator=self.g, device=self.device)

    def autocast(self) -> Any:
        """Mixed precision over fp32 master weights, as training and sampling scripts use it."""
        import torch
        if self.args.dtype == "fp32":
            return nullcontext()
        dtype = torch.float16 if self.args.dtype == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def eps(self, x: Any, t: Any, context: Any) -> Any:
        """eps(x_t, t, c) through either implementation's own calling convention."""
        self.calls += 1
        if self.impl == "ours":
            return self.unet(x, t, context=context)
        return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]

    def forward(self) -> Callable[[], None]:
        """One inference forward of the batch (eval mode, no autograd)."""
        import torch
        self.unet.eval()

        @torch.no_grad()
        def forward() -> None:
            with self.autocast():
                self.eps(self.x0, self.t, self.c)
        return forward

    def train(self, checkpointing: bool) -> Callable[[], None]:
        """One DDPM training step (Ho et al. 2020, Alg. 1): q_sample, eps-MSE, backward, AdamW."""
        import torch
        import torch.nn.functional as F
        if self.impl == "ours":
            self.unet.set_gradient_checkpointing(checkpointing)
        else:
            (self.unet.enable_gradient_checkpointing if checkpointing else self.unet.disable_gradient_checkpointing)()
        self.unet.train()
        opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-6)
        a = self.acp[self.t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * self.x0 + (1 - a).sqrt() * self.noise  # q_sample, Ho et al. 2020 eq. 4

        def train_step() -> None:
            with self.autocast():
                loss = F.mse_loss(self.eps(x_t, self.t, self.c).float(), self.noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return train_step

    def ddim(self) -> Callable[[], None]:
        """A DDIM loop with classifier-free guidance: ours through DDIMSampler, diffusers' pipeline loop."""
        self.unet.eval()
        return self._ddim_ours() if self.impl == "ours" else self._ddim_diffusers()

    def _ddim_ours(self) -> Callable[[], None]:
        from ldm.models.diffusion.ddim import DDIMSampler
        work = self

        class Denoiser:
            """The two things DDIMSampler reads from a LatentDiffusion: apply_model and the schedule."""
            num_timesteps, alphas_cumprod = self.n_train, self.acp

            def apply_model(self, x: Any, t: Any, context: Any) -> Any:
                return work.eps(x, t, context)

        sampler, (B, C, L, _) = DDIMSampler(Denoiser()), self.x0.shape

        def ddim() -> None:
            with self.autocast():
                sampler.sample(self.args.steps, B, (C, L, L), conditioning=self.c, verbose=False, eta=0.0,
                               unconditional_guidance_scale=GUIDANCE_SCALE, unconditional_conditioning=self.uc,
                               generator=self.g, disable_progress=True)
        return ddim

    def _ddim_diffusers(self) -> Callable[[], None]:
        import torch
        from diffusers import DDIMScheduler
        # The original SD v1 schedule in diffusers' terms ("scaled_linear" is linear in sqrt(beta)).
        sched = DDIMScheduler(num_train_timesteps=self.n_train, beta_start=self.start, beta_end=self.end,
                              beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                              clip_sample=False)

        @torch.no_grad()
        def ddim() -> None:
            # StableDiffusionPipeline's loop: [uncond; cond] in one batch, then the guidance mix.
            sched.set_timesteps(self.args.steps, device=self.device)
            x = torch.randn(self.x0.shape, generator=self.g, device=self.device) * sched.init_noise_sigma
            context = torch.cat([self.uc, self.c])
            with self.autocast():
                for t in sched.timesteps:
                    e_u, e_c = self.eps(torch.cat([x, x]), t, context).chunk(2)
                    x = sched.step(e_u + GUIDANCE_SCALE * (e_c - e_u), t, x).prev_sample
        return ddim


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build one model, run one measurement ``warmup + repeat`` times, and report seconds and memory."""
    import torch
    # Both workers import the same modules before the baseline is read: diffusers' import pulls in much of
    # torch (torch._dynamo among others) that our worker would otherwise load lazily in its first optimizer
    # step, which showed up as ~70 MiB of phantom "activation" memory on our side.
    from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: F401
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: F401
    from ldm.models.diffusion.ddim import DDIMSampler  # noqa: F401
    impl, measurement = args._worker.split(":")
    meter = Meter(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_params = load_model_params(resolve_config(args.config))
    unet = build_unet(impl, model_params["unet_config"]["params"]).to(args.device)
    model_bytes = meter.model_built()
    work = Workload(impl, unet, model_params, args)
    fn = {"forward": work.forward, "train": lambda: work.train(False), "train_ckpt": lambda: work.train(True),
          "ddim": work.ddim}[measurement]()
    seconds = meter.time(fn, args.warmup, args.repeat)
    per = args.batch if measurement == "ddim" else 1  # DDIM is reported per image
    return dict(impl=impl, measurement=measurement, seconds=[s / per for s in seconds],
                median_s=statistics.median(seconds) / per, model_bytes=model_bytes, peak_bytes=meter.peak(),
                unet_calls=work.calls // (args.warmup + args.repeat), threads=torch.get_num_threads(),
                device_name=meter.device_name())


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def spawn(cell: dict[str, str], argv: Sequence[str], threads: int = 0) -> dict[str, Any]:
    """Run one cell (e.g. ``{"impl": "ours", "measurement": "train"}``) in a fresh interpreter, so its peak RSS
    is its own; the result, or ``cell`` with an ``error``."""
    print(f"[benchmark] {' '.join(cell.values())} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--_worker", ":".join(cell.values())]
    # Native libraries with their own OpenMP team (bitsandbytes' CPU kernels) honour only the environment.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    if proc.returncode < 0:  # SIGKILL with no traceback is, in practice, the kernel's out-of-memory killer
        hint = " (out of memory?)" if proc.returncode == -9 else ""
        return dict(cell, error=f"killed by signal {-proc.returncode}{hint}")
    last = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]  # the exception, usually
    return dict(cell, error=f"exit {proc.returncode}: {last}")


def run_cells(cells: list[dict[str, str]], argv: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every cell in its own worker, ``--jobs`` at a time. One at a time by default: cells would share the cores,
    and two v1 training steps would not fit in 24 GiB. ``--json`` is rewritten as each cell finishes, so a long
    run that is interrupted keeps the cells it measured."""
    results: list[Optional[dict[str, Any]]] = [None] * len(cells)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(spawn, cell, argv, args.threads): i for i, cell in enumerate(cells)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if args.json:
                write_json(args, [r for r in results if r is not None], complete=False)
    return results


def write_json(args: argparse.Namespace, results: list[dict[str, Any]], complete: bool = True) -> None:
    """The settings and the raw results; ``complete`` is false while cells are still running."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "_worker"}
    args.json.write_text(json.dumps(dict(settings=settings, complete=complete, results=results), indent=2))


def fmt_bytes(n: float) -> str:
    """MiB below a GiB (the tiny config), GiB above."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    """ours / diffusers, or "-" when a cell is missing."""
    return f"{a / b:.2f}" if a and b else "-"


def table_rows(results: list[dict[str, Any]], measurements: Sequence[str]) -> list[list[str]]:
    """One row per measurement: times, time ratio, peaks (+ increment over the built model), peak ratios."""
    by = {(r["impl"], r["measurement"]): r for r in results}
    rows = []
    for m in measurements:
        o, d = by.get(("ours", m), {}), by.get(("diffusers", m), {})
        times = [f"{r['median_s']:.4g}" if "median_s" in r else ("failed" if "error" in r else "-") for r in (o, d)]
        incr = [r["peak_bytes"] - r["model_bytes"] if "peak_bytes" in r else None for r in (o, d)]
        peaks = [f"{fmt_bytes(r['peak_bytes'])} (+{fmt_bytes(i)})" if i is not None else "-"
                 for r, i in zip((o, d), incr)]
        rows.append([LABELS[m], *times, ratio(o.get("median_s"), d.get("median_s")), *peaks,
                     ratio(o.get("peak_bytes"), d.get("peak_bytes")), ratio(*incr)])
    return rows


HEADER = ["measurement", "ours", "diffusers", "time ratio", "ours peak (+over model)",
          "diffusers peak (+over model)", "peak ratio", "+over ratio"]


def format_table(header: Sequence[str], rows: list[list[str]], markdown: bool) -> str:
    """A Markdown table, or the same columns aligned for a terminal."""
    if markdown:
        lines = [header, ["---"] + ["---:"] * (len(header) - 1), *rows]
        return "\n".join("| " + " | ".join(r) + " |" for r in lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [header, *rows])


def describe(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    """The header: machine, versions and settings, and what the DDIM row leaves out."""
    ok = [r for r in results if "device_name" in r]
    machine = f"{ok[0]['device_name']}, {ok[0]['threads']} torch threads" if ok else args.device
    lines = [f"{machine} | torch {version('torch')} | diffusers {version('diffusers')} | config {args.config} | "
             f"latent {args.latent}x{args.latent} ({8 * args.latent} px) | batch {args.batch} | {args.dtype} | "
             f"median of {args.repeat} after {args.warmup} warm-up",
             f"DDIM: {args.steps} steps, guidance {GUIDANCE_SCALE} (2x batch per UNet call), random context "
             f"[B, {CONTEXT_TOKENS}, context_dim]: UNet only, no text encoder or VAE (the UNet dominates)."]
    calls = {r["impl"]: r["unet_calls"] for r in ok if r["measurement"] == "ddim"}
    if len(set(calls.values())) > 1:
        lines.append(f"Note: the DDIM loops made different numbers of UNet calls {calls}: the original timestep "
                     f"selection can add a step; compare per call.")
    memory = "peak allocated CUDA memory" if args.device == "cuda" else "peak RSS of a fresh process per cell"
    lines.append(f"Memory: {memory}; (+x) = above the memory held after building the model. Ratios: ours/diffusers.")
    return "\n".join(lines)


def dreambooth_module() -> ModuleType:
    """``bench_dreambooth.py`` beside this file (imported on demand: the unet suite does not need it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_dreambooth
    return bench_dreambooth


def unet_suite(args: argparse.Namespace, argv: Sequence[str]) -> list[dict[str, Any]]:
    """The unet suite's cells (implementation x measurement), measured, and its table printed."""
    measurements = [m for m in args.only.split(",") if m]
    impls = [i for i in args.impl.split(",") if i]
    bad = set(measurements) - set(MEASUREMENTS) | set(impls) - set(IMPLS)
    if bad:
        raise SystemExit(f"unknown --only/--impl entries: {sorted(bad)}")
    resolve_config(args.config)
    results = run_cells([dict(impl=impl, measurement=m) for m in measurements for impl in impls], argv, args)
    print(describe(args, results))
    print(format_table(HEADER, table_rows(results, measurements), args.markdown))
    return results


def dreambooth_suite(args: argparse.Namespace, argv: Sequence[str]) -> list[dict[str, Any]]:
    """The dreambooth suite's cells (one per variant), measured, and its table printed."""
    suite = dreambooth_module()
    variants = suite.select_variants(args.variants)
    resolve_config(args.config, suite.CONFIGS)
    results = run_cells([dict(variant=v) for v in variants], argv, args)
    print(suite.describe(args, results))
    print(format_table(suite.HEADER, suite.table_rows(results), args.markdown))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Spawn one worker per cell and print the table; torch is imported by the workers only, so the parent's
    own footprint (which a forked child briefly shares) stays small."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args._worker:
        sys.path.insert(0, str(REPO))
        result = (run_worker(args) if args.suite == "unet" else
                  dreambooth_module().run_worker(args, Meter(args.device)))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    results = (unet_suite if args.suite == "unet" else dreambooth_suite)(args, argv)
    for r in results:
        if "error" in r:
            print(f"{' '.join(v for k, v in r.items() if k != 'error')} failed: {r['error']}")
    if args.json:
        write_json(args, results)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
