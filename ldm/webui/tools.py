"""The Generate, Inpaint and Models tabs' work, done by the project's own scripts.

Text-to-image calls ``scripts/stable_txt2img.py`` (its parser and ``sample``) in this process, so its files and
their PNG metadata are exactly the script's. Image-to-image, inpainting and the model tools run their scripts
(``img2img.py``, ``inpaint.py``, ``prune_ckpt.py``, ``convert_to_diffusers.py``, ``merge_lora.py``) as child
processes with their documented flags: a crash there is a message here, and the UI needs nothing from them but
their command lines. A script's one-line error (``prog: error: ...``) becomes a :class:`ToolError` with that line.

No text from the page is ever parsed as a flag: values are joined to their flags (``--prompt=TEXT``), file names
follow ``--``, and argparse's help and exits inside this process become a :class:`ToolError`.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from ldm.webui.paths import WEIGHT_SUFFIXES

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
#: Models the project ships, offered in every checkpoint picker (to compare before and after training), with the
#: config each is built with.
SHIPPED = {REPO / "assets" / "toy" / "toy-ldm.safetensors": REPO / "configs" / "toy" / "inference.yaml"}
SCRIPT_TIMEOUT_S = 6 * 3600
EXTRA_SCRIPTS_ENV = "DREAMBOOTH_WEBUI_EXTRA_SCRIPTS"
#: The parts of a model config that decide which inference config builds its checkpoints.
SIGNATURE_KEYS = ("model.params.unet_config.params.model_channels", "model.params.unet_config.params.channel_mult",
                  "model.params.unet_config.params.context_dim", "model.params.unet_config.params.in_channels",
                  "model.params.first_stage_config.params.ddconfig.ch_mult",
                  "model.params.first_stage_config.params.ddconfig.ch", "model.params.cond_stage_config.target",
                  "model.params.conditioner_config.target", "model.params.image_size")


class ToolError(RuntimeError):
    """A script refused its input or failed; the message is its one line (or the last line it wrote)."""


@dataclass
class SampleOptions:
    """What txt2img, img2img and inpainting share (the scripts' flags of the same names)."""
    prompt: str
    negative_prompt: str = ""
    seed: int = 42
    ddim_steps: int = 50
    scale: float = 7.5
    sampler: str = "ddim"
    n_samples: int = 1
    config: Optional[Path] = None
    lora: Optional[Path] = None
    lora_strength: float = 1.0
    guidance: Optional[float] = None  # a guidance-distilled model's (FLUX.1 [dev]) guidance input
    parts: dict[str, Path] = field(default_factory=dict)  # a family's other files (FLUX.1: --ae, --t5, ...)

    def argv(self) -> list[str]:
        """The scripts' flags. Every value is joined to its flag (``--prompt=TEXT``): argparse takes what follows
        ``=`` as the value whatever it looks like, so a prompt such as ``--from-file=/etc/passwd`` or ``--help``
        reaches the script as a prompt, never as a flag. Sampler "auto" leaves the choice to the script (the
        model family's default)."""
        args = [f"--prompt={self.prompt}", f"--negative_prompt={self.negative_prompt}", f"--seed={self.seed}",
                f"--ddim_steps={self.ddim_steps}", f"--scale={self.scale}", f"--n_samples={self.n_samples}",
                "--n_iter=1"]
        if self.sampler != "auto":
            args.append(f"--sampler={self.sampler}")
        if self.guidance is not None:
            args.append(f"--guidance={self.guidance}")
        args += [f"--{flag}={path}" for flag, path in self.parts.items()]
        if self.config is not None:
            args.append(f"--config={self.config}")
        if self.lora is not None:
            args.append(f"--lora={self.lora}:{self.lora_strength}")
        return args


#: Where a family's other files are looked for in the model folder, by flag (FLUX.1's releases' names first).
PART_FILES = {"ae": ("ae.safetensors", "*ae*.safetensors"), "t5": ("t5xxl*.safetensors", "*t5*.safetensors"),
              "clip": ("clip_l*.safetensors", "*clip*.safetensors"), "t5_tokenizer": ("spiece.model", "*.model")}


def for_checkpoint(options: SampleOptions, ckpt: Path, model_dir: Path, config: Optional[Path] = None
                   ) -> SampleOptions:
    """``options`` fitted to the checkpoint's family: a guidance-distilled model (FLUX.1 [dev]) takes the page's
    guidance scale as its guidance input and runs without classifier-free guidance (scale 1), as does schnell; a
    family released as separate files gets them from the model folder (:data:`PART_FILES`), or a one-line error
    naming the file to put there."""
    from ldm.families import FAMILIES, config_family, detect_family
    from ldm.weights.checkpoint import checkpoint_shapes
    name = config_family(OmegaConf.load(config)) if config is not None else detect_family(checkpoint_shapes(ckpt))
    family = FAMILIES.get(name or "")
    if family is None or not family.components:
        return options
    guidance = options.scale if "guidance" in family.sampling_defaults else None
    return replace(options, scale=1.0, guidance=guidance, parts=find_parts(family, model_dir, exclude=ckpt))


def find_parts(family: Any, model_dir: Path, exclude: Optional[Path] = None) -> dict[str, Path]:
    """The family's other files (and its tokenizer) in the model folder, flag -> file (:data:`PART_FILES`); a
    one-line ``ToolError`` naming the first one missing."""
    parts = {}
    for flag in [*family.components, *family.config_flags]:
        found = next((p for pattern in PART_FILES[flag] for p in sorted(model_dir.rglob(pattern))
                      if p.is_file() and p != exclude), None)
        if found is None:
            raise ToolError(f"{family.label} needs its {flag} file beside it: put {PART_FILES[flag][0]} in "
                            f"{model_dir}")
        parts[flag] = found
    return parts


# ---- which files are what ------------------------------------------------------------------------------------

def is_lora_file(path: Path) -> bool:
    """A LoRA adapter (kohya or PEFT key names) rather than a model; read from the safetensors header only."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return any("lora" in k for k in f.keys())
    except Exception:  # noqa: BLE001 - an unreadable file is not offered as an adapter
        return False


def inference_configs() -> list[Path]:
    return sorted(REPO.glob("configs/**/*inference*.yaml"))


@lru_cache(maxsize=64)
def _signature(config_path: Path, mtime: float) -> tuple:
    cfg = OmegaConf.load(config_path)
    return tuple(str(OmegaConf.select(cfg, key, default=None)) for key in SIGNATURE_KEYS)


def inference_config_for(ckpt: Path) -> Optional[Path]:
    """The inference config of a checkpoint inside a run folder (``<run>/checkpoints/x.ckpt``): the one whose
    architecture equals the run's saved config; a shipped model's own (:data:`SHIPPED`). None elsewhere: the
    scripts then recognise the model's family from its keys."""
    if ckpt.resolve() in SHIPPED:
        return SHIPPED[ckpt.resolve()]
    run = ckpt.parent.parent
    saved = sorted((run / "configs").glob("*-project.yaml")) if ckpt.parent.name == "checkpoints" else []
    if not saved:
        return None
    wanted = _signature(saved[-1], saved[-1].stat().st_mtime)
    return next((c for c in inference_configs() if _signature(c, c.stat().st_mtime) == wanted), None)


def model_config(choice: Optional[str], ckpt: Path) -> Optional[Path]:
    """The config a checkpoint is built with: the one chosen (one of the repository's inference configs), else
    the one of its run (:func:`inference_config_for`), else None (the scripts recognise the family)."""
    if not choice:
        return inference_config_for(ckpt)
    chosen = Path(choice).resolve()
    if chosen not in [c.resolve() for c in inference_configs()]:
        raise ToolError(f"model config {choice}: not one of the repository's inference configs")
    return chosen


def config_choices() -> list[tuple[str, str]]:
    return [("auto (the run's, or from the checkpoint's keys)", "")] + [
        (str(c.relative_to(REPO)), str(c)) for c in inference_configs()]


def model_files(*folders: Path) -> tuple[list[Path], list[Path]]:
    """``(checkpoints, LoRA adapters)`` below ``folders``; the shipped models (:data:`SHIPPED`) last."""
    from ldm.webui.paths import weight_files
    files = weight_files(*folders)
    loras = [p for p in files if is_lora_file(p)]
    return [p for p in files if p not in loras] + [p for p in SHIPPED if p.is_file()], loras


@lru_cache(maxsize=256)
def _step(path: Path, mtime: float, size: int) -> Optional[int]:
    """The training step a weights file records (Lightning's ``global_step``, or our safetensors metadata)."""
    from ldm.weights.checkpoint import CheckpointError
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                step = (f.metadata() or {}).get("global_step")
        else:
            import torch
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
        return int(step) if step is not None else None
    except (OSError, ValueError, RuntimeError, CheckpointError, AttributeError):
        return None


def weights_label(path: Path, where: str) -> str:
    """What a picker shows for a weights file: the file, the step it was saved at, its size and its run, what
    tells files apart first, so a narrow picker still does (``last.ckpt · step 400 · 21.7 MB ·
    2026-12-03T10-14-54_sks_robot``); elsewhere the file as ``where`` names it (its path in the model folder, or
    "shipped")."""
    from ldm.util import fmt_bytes
    stat = path.stat()
    step = _step(path, stat.st_mtime, stat.st_size)
    in_run = path.parent.name == "checkpoints"
    size = fmt_bytes(stat.st_size, True) if stat.st_size >= 100_000 else f"{stat.st_size / 1000:.0f} kB"
    return " · ".join([path.name if in_run else where] + ([f"step {step}"] if step is not None else []) + [size]
                      + [path.parent.parent.name] * in_run)


# ---- sampling ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are files, not a package)."""
    spec = importlib.util.spec_from_file_location(f"webui_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def txt2img(ckpt: Path, options: SampleOptions, outdir: Path, size: Optional[tuple[int, int]] = None) -> list[Path]:
    """``stable_txt2img.py`` with these flags, in this process; returns the sample files (the grid is written
    too, as the script does, and left out of the list)."""
    script = load_script("stable_txt2img")
    argv = [f"--ckpt={ckpt}", f"--outdir={outdir}", *options.argv()]
    if size is not None:
        argv += [f"--W={size[0]}", f"--H={size[1]}"]
    opt = parse_in_process(script.build_parser(), argv)
    if opt.prompt != options.prompt or opt.negative_prompt != options.negative_prompt or opt.from_file:
        raise ToolError("the prompt was not passed to stable_txt2img.py as text")  # what argv() guarantees
    from ldm.sampling.cli import user_errors
    try:
        written = script.sample(opt)
    except user_errors() as e:
        raise ToolError(str(e)) from None
    return [p for p in written if p.parent.name == "samples"]


def parse_in_process(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` inside the UI's process: where argparse would print (an error, help) and end
    the process, a :class:`ToolError` with its line is raised instead, so no request can end or wedge the
    server."""
    def refuse(message: str) -> None:
        raise ToolError(message)

    def no_exit(status: int = 0, message: Optional[str] = None) -> None:
        raise ToolError(" ".join((message or f"{parser.prog} wanted to exit ({status})").split()))

    parser.error, parser.exit = refuse, no_exit
    parser.print_help = parser.print_usage = lambda file=None: None
    try:
        return parser.parse_args(argv)
    except SystemExit as e:  # anything else that would end the process
        raise ToolError(f"{parser.prog} wanted to exit ({e.code})") from None


def script_path(name: str) -> Path:
    """``scripts/<name>.py``; while a script is missing from this checkout (inpaint.py and img2img.py come from
    another branch), the folder ``DREAMBOOTH_WEBUI_EXTRA_SCRIPTS`` names is looked in too (the tests' stand-ins)."""
    script = SCRIPTS / f"{name}.py"
    extra = os.environ.get(EXTRA_SCRIPTS_ENV)
    if not script.is_file() and extra and (Path(extra) / f"{name}.py").is_file():
        return Path(extra) / f"{name}.py"
    if not script.is_file():
        raise ToolError(f"{script}: not in this checkout")
    return script


def run_script(name: str, args: Sequence[str], timeout_s: float = SCRIPT_TIMEOUT_S) -> str:
    """``python scripts/<name>.py args`` in a child process; its output, or :class:`ToolError` with its error."""
    script = script_path(name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{name}.py did not finish within {duration(timeout_s)} and was stopped") from None
    if done.returncode != 0:
        raise ToolError(error_line(done.stderr or done.stdout, name, done.returncode))
    return done.stdout


def duration(seconds: float) -> str:
    """``2 s``, ``5 min``, ``6 h``: the unit that says it best."""
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def error_line(output: str, name: str, code: int) -> str:
    """The script's ``error:`` line, else its last line, else the exit code."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\berror: ", line)]
    if errors:
        return errors[-1].split("error: ", 1)[1]
    reason = f" (killed by signal {-code})" if code < 0 else f" (exit code {code})"
    return f"{name}.py failed{reason}" + (f": {lines[-1]}" if lines else "")


def _new_samples(outdir: Path, before: set[Path]) -> list[Path]:
    return sorted(set((outdir / "samples").glob("*.png")) - before)


def inpaint(model_path: Path, image: Path, mask: Path, options: SampleOptions, outdir: Path, strength: float,
            mask_blur: int = 4, only_masked: bool = False, padding: int = 32) -> list[Path]:
    """``scripts/inpaint.py`` (white in ``mask`` = repaint); returns the samples it wrote into ``outdir``."""
    before = set((outdir / "samples").glob("*.png"))
    args = [f"--ckpt={model_path}", f"--image={image}", f"--mask={mask}", f"--strength={strength}",
            f"--mask_blur={mask_blur}", f"--padding={padding}", f"--outdir={outdir}", *options.argv()]
    run_script("inpaint", args + (["--only_masked"] if only_masked else []))
    return _new_samples(outdir, before)


def img2img(model_path: Path, image: Path, options: SampleOptions, outdir: Path, strength: float) -> list[Path]:
    """``scripts/img2img.py``: the whole image repainted to ``strength``; returns the samples written."""
    before = set((outdir / "samples").glob("*.png"))
    run_script("img2img", [f"--ckpt={model_path}", f"--init-img={image}", f"--strength={strength}",
                           f"--outdir={outdir}", *options.argv()])
    return _new_samples(outdir, before)


# ---- model tools ---------------------------------------------------------------------------------------------

#: PNG text keys the sampling scripts write, in the order a person reads them.
SETTING_KEYS = ("prompt", "negative_prompt", "seed", "iteration", "index_in_batch", "steps", "scale", "guidance",
                "sampler", "eta", "size", "strength", "mask", "mask_blur", "checkpoint", "lora")


def png_settings(path: Path) -> dict[str, str]:
    """The generation settings a picture made by this project carries (its PNG text); ``ToolError`` (one line)
    for a file that is no PNG or carries none."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ToolError(f"{path.name}: not a readable picture ({' '.join(str(e).split())})") from None
    if not any(k in text for k in ("prompt", "seed", "steps")):
        raise ToolError(f"{path.name}: carries no generation settings (only pictures saved by this project's "
                        f"scripts and web UI do)")
    ordered = {k: text[k] for k in SETTING_KEYS if k in text}
    return ordered | {k: v for k, v in text.items() if k not in ordered}


def settings_caption(path: Path) -> str:
    """One line under a result: seed (and which of the batch), steps, scale, sampler, size, checkpoint."""
    try:
        s = png_settings(path)
    except ToolError:
        return path.name
    seed = ""
    if "seed" in s:
        batch, index = int(s.get("iteration", 0)), int(s.get("index_in_batch", 0))
        seed = f"seed {s['seed']}" + (f", batch {batch + 1} image {index + 1}" if batch else
                                      f", image {index + 1}" if "index_in_batch" in s else "")
    parts = [seed, f"{s['steps']} steps" if "steps" in s else "", f"scale {s['scale']}" if "scale" in s else "",
             s.get("sampler", ""), s.get("size", ""), s.get("checkpoint", "")]
    return " · ".join(p for p in parts if p)


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def prune(ckpt: Path, out: Path, overwrite: bool = False) -> Path:
    """A fp16 safetensors file with what sampling needs (``prune_ckpt.py --fp16 --safetensors``)."""
    run_script("prune_ckpt", ["--fp16", "--safetensors"] + ["--overwrite"] * overwrite + ["--", str(ckpt), str(out)])
    return out.with_suffix(".safetensors")


def convert(ckpt: Path, out: Path, config: Optional[Path]) -> Path:
    """A diffusers folder (``convert_to_diffusers.py``)."""
    run_script("convert_to_diffusers", ([f"--config={config}"] if config else []) + ["--", str(ckpt), str(out)])
    return out


def merge(ckpt: Path, lora: Path, strength: float, out: Path, overwrite: bool = False) -> Path:
    """The adapter baked into the model (``merge_lora.py``)."""
    run_script("merge_lora", ["--overwrite"] * overwrite + ["--", str(ckpt), f"{lora}:{strength}", str(out)])
    return out


def is_weights(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES
