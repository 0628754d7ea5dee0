"""What a model family is (:class:`Family`), and the key-shape helpers the families' records share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

UNET = "model.diffusion_model."
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    config: str  # the inference config, relative to the repository's configs/ folder
    architecture: str  # modelspec.architecture
    package: str  # ldm/families/<package>/: where the family's parts live
    #: Whether a state dict (key -> shape) / a model config's ``model.params`` is this family's.
    matches_keys: Callable[[Shapes], bool] = field(repr=False, default=lambda shapes: False)
    matches_config: Callable[[Mapping], bool] = field(repr=False, default=lambda params: False)
    #: LoRA files: state-dict prefix of each adapted sub-model -> sd-scripts' key prefix.
    lora_prefixes: Mapping[str, str] = field(default_factory=dict)
    #: How sd-scripts names the UNet's modules in LoRA files: by diffusers' blocks (``down_blocks_0_...``, it
    #: trains SD v1 on diffusers' UNet) or by the original ones (``input_blocks_4_1_...``, its SDXL UNet is sgm's).
    lora_unet_names: Literal["diffusers", "original"] = "diffusers"
    #: What a pruned (sampling-only) file keeps: the sub-models' key prefixes, and whether the schedule buffers.
    inference_prefixes: tuple[str, ...] = ()
    schedule_in_file: bool = True
    #: Released as separate files (FLUX.1: the transformer, ``ae``, ``t5``, ``clip``): the prefix each part's keys
    #: take in the model, by the name of its command-line flag (``--ae``, ``--t5``, ``--clip``), and the prefix a
    #: file of the network alone leaves out (``model.diffusion_model.``); empty for one-file families.
    components: Mapping[str, str] = field(default_factory=dict)
    bare_prefix: str = ""
    #: Keys that are one tensor saved under two names, either of which a file may hold (T5's tied embedding).
    tied_keys: Mapping[str, str] = field(default_factory=dict)
    #: Command-line settings of the family's parts -> the config key they set (``--t5_tokenizer``).
    config_flags: Mapping[str, str] = field(default_factory=dict)
    #: The sampling scripts' defaults for this family, where they differ from the scripts' own (FLUX.1: steps,
    #: ``scale`` 1 (no classifier-free guidance), the distilled ``guidance``).
    sampling_defaults: Mapping[str, float] = field(default_factory=dict)

    @property
    def diffusers_module(self) -> str:
        """The module that writes the family's diffusers pipeline folder (``pipeline_configs``, ``write_pipeline``)."""
        return f"ldm.families.{self.package}.diffusers"


def strip_prefix(shapes: Shapes, prefix: str) -> Shapes:
    """``shapes`` with ``prefix`` taken off the keys that have it (the others kept): a network saved alone and the
    same network inside a whole model look alike."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in shapes.items()}


def unet_in_channels(shapes: Shapes) -> int:
    """The UNet's input channels from a state dict's shapes (0 without a UNet): 4, or 9 for inpainting."""
    shape = shapes.get(UNET_IN)
    return int(shape[1]) if shape is not None and len(shape) > 1 else 0
