"""``--suite unet``: our UNet (SD v1 or SDXL) beside diffusers' ``UNet2DConditionModel`` holding the same weights.

Rows: UNet forward (eval, no grad); one training step (noised latents, MSE to eps, backward, AdamW) without and
with gradient checkpointing; a classifier-free-guided DDIM loop, per image. Cells are (implementation,
measurement). Each reports ``first_output``, the first call's result as one number (the training step's loss,
the norm of the forward's prediction or of the DDIM sample): both implementations compute the same thing from
the same weights and inputs, so the two must agree, which the tests check.

SDXL (``--config sdxl`` / ``tiny-sdxl``): diffusers' model has ``addition_embed_type: text_time`` and takes the
pooled text embedding and the six size/crop numbers (``added_cond_kwargs``); ours takes the vector ``y`` its
conditioner makes of the same numbers (pooled ++ sinusoidal embeddings). ``--profile N`` adds the top N backward
nodes of one profiled training step of each implementation (benchmarks/profile.py).
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from benchmarks.harness import (REPO, Cell, Meter, Result, comparison_header, comparison_rows, fill_zero_parameters_,
                                process_words, summary_line)
from benchmarks.profile import backward_profile, format_profiles

IMPLS = ("ours", "diffusers")
DTYPES = ("fp32", "fp16", "bf16")
LABELS = {"forward": "UNet forward (s/call)", "train": "train step (s)",
          "train_ckpt": "train step, grad ckpt (s)", "ddim": "DDIM loop (s/image)",
          "train_compile": "train step, ours compiled, diffusers eager (s)"}
#: What ``--only`` measures when not given: ``train_compile`` compiles the UNet's forward and backward first
#: (minutes at full size), so it is asked for by name.
DEFAULT_MEASUREMENTS = ("forward", "train", "train_ckpt", "ddim")
MEASUREMENTS = (*DEFAULT_MEASUREMENTS, "train_compile")
GUIDANCE_SCALE = 7.5
CONTEXT_TOKENS = 77  # CLIP's sequence length, what SD v1's cross-attention sees
#: SDXL's six size/crop numbers per image: original (h, w), crop top-left (y, x), target (h, w), in pixels.
SIZE_NUMBERS = (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)


def is_sdxl(model_params: dict[str, Any]) -> bool:
    return "conditioner_config" in model_params


def diffusers_unet_config(model_params: dict[str, Any]) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config our export writes: SD v1's, or SDXL's with ``text_time``."""
    if is_sdxl(model_params):
        from ldm.families.sdxl.diffusers import pipeline_configs
        return pipeline_configs(model_params)["unet"]
    from ldm.export.diffusers import unet_config
    return unet_config(model_params)


def build_unet(impl: str, model_params: dict[str, Any], seed: int = 0) -> Any:
    """Our UNet with seeded default init (zero-initialised layers filled with noise), or diffusers' UNet holding
    those very tensors (fp32, CPU).

    diffusers' model is created on the meta device and takes the converted tensors by assignment: the
    converter only renames keys, so the weights exist once and neither worker's peak counts a second copy.
    """
    import torch
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(seed)
    ours = fill_zero_parameters_(UNetModel(**model_params["unet_config"]["params"]))
    if impl == "ours":
        return ours
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from ldm.export.diffusers import UNET
    config = diffusers_unet_config(model_params)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config)
    weights = convert_ldm_unet_checkpoint({UNET + k: v for k, v in ours.state_dict().items()}, config)
    theirs.load_state_dict(weights, strict=True, assign=True)
    assert not any(t.is_meta for t in theirs.state_dict().values()), "a diffusers tensor was left unloaded"
    return theirs


class Workload:
    """Inputs shared by every measurement, built once outside the timed region, and the UNet call itself.

    ``calls`` counts UNet evaluations, so the report can say when two DDIM loops did not make the same number;
    ``first_output`` keeps the first call's result as one number.
    """

    def __init__(self, impl: str, unet: Any, model_params: dict[str, Any], args: argparse.Namespace) -> None:
        import torch
        from ldm.models.diffusion.schedule import make_beta_schedule, schedule_coefficients
        self.impl, self.unet, self.args, self.calls = impl, unet, args, 0
        self.compiled = False
        self.first_output: float | None = None
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
        self.y = self.added = None
        if is_sdxl(model_params):
            self._size_conditioning(model_params, B)

    def _size_conditioning(self, model_params: dict[str, Any], batch: int) -> None:
        """SDXL's vector condition, the same numbers for both: diffusers' ``added_cond_kwargs`` (pooled text
        embedding, six size/crop numbers) and ours ``y`` = pooled ++ their sinusoidal embeddings, made by our
        conditioner's own embedder (``ConcatTimestepEmbedderND``)."""
        import torch
        from ldm.modules.encoders.conditioner import ConcatTimestepEmbedderND
        outdim = diffusers_unet_config(model_params)["addition_time_embed_dim"]
        adm = model_params["unet_config"]["params"]["adm_in_channels"]
        pooled = torch.randn(batch, adm - len(SIZE_NUMBERS) * outdim, generator=self.g, device=self.device)
        time_ids = torch.tensor([SIZE_NUMBERS] * batch, device=self.device)
        self.added = {"text_embeds": pooled, "time_ids": time_ids}
        self.y = torch.cat([pooled, ConcatTimestepEmbedderND(outdim)(time_ids)], dim=1)

    def keep(self, value: Any) -> None:
        """The first call's result: a scalar as it is, a tensor as its L2 norm (in float64)."""
        if self.first_output is None:
            self.first_output = float(value.detach().double().norm())

    def autocast(self) -> Any:
        """Mixed precision over fp32 master weights, as training and sampling scripts use it."""
        import torch
        if self.args.dtype == "fp32":
            return nullcontext()
        dtype = torch.float16 if self.args.dtype == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def eps(self, x: Any, t: Any, context: Any) -> Any:
        """eps(x_t, t, c) through either implementation's own calling convention (SDXL: with the vector
        condition, repeated for a guidance batch of [uncond; cond])."""
        self.calls += 1
        copies = x.shape[0] // self.x0.shape[0]
        if self.impl == "ours":
            y = self.y.repeat(copies, 1) if self.y is not None else None
            return self.unet(x, t, context=context, y=y)
        added = {k: v.repeat(copies, 1) for k, v in self.added.items()} if self.added is not None else None
        return self.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]

    def forward(self) -> Callable[[], None]:
        """One inference forward of the batch (eval mode, no autograd)."""
        import torch
        self.unet.eval()

        @torch.no_grad()
        def forward() -> None:
            with self.autocast():
                self.keep(self.eps(self.x0, self.t, self.c))
        return forward

    def train(self, checkpointing: bool, compiled: bool = False) -> Callable[[], None]:
        """One DDPM training step (Ho et al. 2020, Alg. 1): q_sample, eps-MSE, backward, AdamW. ``compiled``:
        ours through what ``model.params.compile: true`` runs (the compilation falls in the warm-up calls);
        diffusers' stays eager, as its train_dreambooth.py runs it."""
        import torch
        import torch.nn.functional as F
        if compiled and self.impl == "ours":
            from ldm.modules.speed import compile_or_eager
            if not compile_or_eager(self.unet, self.device):
                raise RuntimeError("torch.compile cannot run here")
            self.compiled = True
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
            self.keep(loss)
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
                x, _ = sampler.sample(self.args.steps, B, (C, L, L), conditioning=self.c, verbose=False, eta=0.0,
                                      unconditional_guidance_scale=GUIDANCE_SCALE,
                                      unconditional_conditioning=self.uc, generator=self.g, disable_progress=True)
            self.keep(x)
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
            self.keep(x)
        return ddim


class UNetSuite:
    help = "our UNet vs diffusers' UNet2DConditionModel with the same weights"
    configs = {"tiny": REPO / "configs/stable-diffusion/tiny-inference.yaml",
               "v1": REPO / "configs/stable-diffusion/v1-inference.yaml",
               "tiny-sdxl": REPO / "configs/stable-diffusion/tiny-sdxl-inference.yaml",
               "sdxl": REPO / "configs/stable-diffusion/sdxl-base-inference.yaml"}
    header = comparison_header(*IMPLS)

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px for SD v1)")
        group.add_argument("--batch", type=int, default=2,
                           help="images per batch (DDIM runs 2x this through the UNet)")
        group.add_argument("--dtype", choices=DTYPES, default="fp32",
                           help="fp16/bf16 run under autocast over fp32 master weights")
        group.add_argument("--steps", type=int, default=10, help="DDIM steps of the sampling measurement")
        group.add_argument("--only", default=",".join(DEFAULT_MEASUREMENTS),
                           help=f"comma-separated subset of {MEASUREMENTS} (train_compile: ours compiled beside "
                                f"diffusers' eager step; the warm-up calls include the compilation, so give "
                                f"--warmup 2 or more)")
        group.add_argument("--impl", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
        group.add_argument("--profile", type=int, default=0, metavar="N",
                           help="also profile one step of each train measurement and print its N slowest "
                                "backward nodes per implementation")

    def cells(self, args: argparse.Namespace) -> list[Cell]:
        measurements = [m for m in args.only.split(",") if m]
        impls = [i for i in args.impl.split(",") if i]
        bad = set(measurements) - set(MEASUREMENTS) | set(impls) - set(IMPLS)
        if bad:
            raise SystemExit(f"unknown --only/--impl entries: {sorted(bad)}")
        return [dict(impl=impl, measurement=m) for m in measurements for impl in impls]

    def preload(self, args: argparse.Namespace) -> None:
        """What every cell imports before its memory baseline (``benchmarks/zygote.py`` does it once). Both sides
        import the same modules: diffusers' import pulls in much of torch (torch._dynamo among others) that our
        worker would otherwise load lazily in its first optimizer step, which showed up as ~70 MiB of phantom
        "activation" memory on our side."""
        from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: F401
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: F401
        from ldm.export.diffusers import model_params  # noqa: F401
        from ldm.models.diffusion.ddim import DDIMSampler  # noqa: F401

    def run_cell(self, args: argparse.Namespace, config: Path, cell: Cell, meter: Meter) -> Result:
        """Build one model, run one measurement ``warmup + repeat`` times."""
        from omegaconf import OmegaConf
        from ldm.export.diffusers import model_params
        self.preload(args)
        params = model_params(OmegaConf.load(config))
        unet = build_unet(cell["impl"], params).to(args.device)
        meter.model_built()
        work = Workload(cell["impl"], unet, params, args)
        m = cell["measurement"]
        fn = {"forward": work.forward, "train": lambda: work.train(False), "train_ckpt": lambda: work.train(True),
              "train_compile": lambda: work.train(False, compiled=True), "ddim": work.ddim}[m]()
        seconds = meter.time(fn)
        calls = work.calls // (args.warmup + args.repeat)
        profile = backward_profile(fn, args.device, args.profile) if args.profile and m.startswith("train") else None
        per = args.batch if m == "ddim" else 1  # DDIM is reported per image
        return dict(seconds=[s / per for s in seconds], unet_calls=calls, first_output=work.first_output,
                    sdxl=is_sdxl(params), compiled=work.compiled, **({"profile": profile} if profile else {}))

    def rows(self, results: list[Result]) -> list[list[str]]:
        return comparison_rows(results, LABELS, *IMPLS)

    def describe(self, args: argparse.Namespace, results: list[Result]) -> str:
        """The header: machine, versions and settings, and what the DDIM row leaves out."""
        settings = [f"latent {args.latent}x{args.latent} ({8 * args.latent} px)", f"batch {args.batch}", args.dtype]
        lines = [summary_line(args, results, ["diffusers"], settings),
                 f"DDIM: {args.steps} steps, guidance {GUIDANCE_SCALE} (2x batch per UNet call), random context "
                 f"[B, {CONTEXT_TOKENS}, context_dim]: UNet only, no text encoder or VAE (the UNet dominates)."]
        calls = {r["impl"]: r["unet_calls"] for r in results if r.get("measurement") == "ddim" and "unet_calls" in r}
        if len(set(calls.values())) > 1:
            lines.append(f"Note: the DDIM loops made different numbers of UNet calls {calls}: the original "
                         f"timestep selection can add a step; compare per call.")
        if any(r.get("sdxl") for r in results):
            lines.append(f"SDXL: pooled text embedding and size/crop numbers {SIZE_NUMBERS} as diffusers' "
                         f"added_cond_kwargs; ours takes them as y (pooled ++ their sinusoidal embeddings).")
        memory = "peak allocated CUDA memory" if args.device == "cuda" else f"peak RSS of {process_words(args)} per cell"
        lines.append(f"Memory: {memory}; (+x) = above the memory held after building the model. "
                     f"Ratios: ours/diffusers.")
        return "\n".join(lines)

    def after_table(self, args: argparse.Namespace, results: list[Result]) -> str:
        """``--profile``: the backward nodes of each train measurement, ours beside diffusers'."""
        blocks = []
        for m in ("train", "train_ckpt", "train_compile"):
            pair = {r["impl"]: r["profile"] for r in results if r.get("measurement") == m and "profile" in r}
            if pair:
                blocks.append(f"{LABELS[m]}\n" + format_profiles(list(pair), list(pair.values())))
        return "\n\n".join(blocks)
