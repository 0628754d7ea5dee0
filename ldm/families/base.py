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

    @property
    def diffusers_module(self) -> str:
        """The module that writes the family's diffusers pipeline folder (``pipeline_configs``, ``write_pipeline``)."""
        return f"ldm.families.{self.package}.diffusers"


def unet_in_channels(shapes: Shapes) -> int:
    """The UNet's input channels from a state dict's shapes (0 without a UNet): 4, or 9 for inpainting."""
    shape = shapes.get(UNET_IN)
    return int(shape[1]) if shape is not None and len(shape) > 1 else 0
