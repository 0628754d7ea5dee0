"""Image and text embedders for DreamBooth's metrics, loaded only from folders and files the user names.

Nothing here downloads: transformers models load with ``local_files_only=True`` from a folder, and every
missing file is reported in one line that names it and what to download. ``transformers`` is imported when an
embedder is built, so the metrics and the dataset reader work without it.

- :class:`ClipEmbedder`: CLIP image and text embeddings (Radford et al. 2021), for CLIP-I and CLIP-T.
- :class:`DinoEmbedder`: DINO ViT-S/16 CLS embeddings (Caron et al. 2021), for DINO and PRES.
- :class:`Lpips`: the LPIPS perceptual distance (Zhang et al. 2018) with its AlexNet trunk, for DIV.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ldm.data.image_loading import to_tensor
from ldm.weights.checkpoint import CheckpointError

CLIP_REPO = "openai/clip-vit-base-patch32"
DINO_REPO = "facebook/dino-vits16"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# DINO's evaluation transform (eval_knn.py / eval_linear.py): Resize(256, bicubic), CenterCrop(224),
# ImageNet mean and std. The resize is 8/7 of the crop so that other input sizes keep the same framing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: The files of the transformers folders the metrics read (a name, or alternatives).
CLIP_FILES = ("config.json", WEIGHT_FILES, "preprocessor_config.json", "vocab.json", "merges.txt")
DINO_FILES = ("config.json", WEIGHT_FILES)


class ModelFilesError(FileNotFoundError):
    """A model folder or file the user must provide is missing; the message is one line saying what to get."""


def require_files(folder: str | Path, groups: Sequence[str | tuple[str, ...]], what: str, get: str) -> Path:
    """Check that ``folder`` holds one file of each group (a name, or a tuple of alternatives).

    ``what`` names the model ("CLIP model folder"), ``get`` says how to obtain it; both go into the error.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelFilesError(f"{what} {folder}: folder not found; {get}")
    missing = []
    for group in groups:
        names = (group,) if isinstance(group, str) else group
        if not any((folder / name).is_file() for name in names):
            missing.append(" or ".join(names))
    if missing:
        raise ModelFilesError(f"{what} {folder}: missing {', '.join(missing)}; {get}")
    return folder


def check_clip_folder(path: str | Path) -> Path:
    """The CLIP model folder, if it holds :data:`CLIP_FILES` (else ``ModelFilesError`` saying what to get)."""
    return require_files(path, CLIP_FILES, "CLIP model folder", _download_hint(CLIP_REPO, path))


def check_dino_folder(path: str | Path) -> Path:
    """The DINO model folder, if it holds :data:`DINO_FILES` (else ``ModelFilesError`` saying what to get)."""
    return require_files(path, DINO_FILES, "DINO model folder", _download_hint(DINO_REPO, path))


def _download_hint(repo: str, folder: str | Path) -> str:
    return (f"download all files of huggingface.co/{repo} into it "
            f"(e.g. `hf download {repo} --local-dir {folder}`)")


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class ClipEmbedder:
    """CLIP image and text embeddings, L2-normalised, from a local copy of a transformers CLIP model.

    The default model of this reproduction is ``openai/clip-vit-base-patch32`` (the folder must hold
    ``config.json``, ``model.safetensors`` or ``pytorch_model.bin``, ``preprocessor_config.json``, ``vocab.json``
    and ``merges.txt``). Images are preprocessed by transformers' PIL image processor with the folder's
    ``preprocessor_config.json`` (bicubic resize of the short side, centre crop, CLIP mean/std): the fast
    processor would need torchvision, which this codebase does not use.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        from transformers import CLIPModel, CLIPTokenizer
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        folder = check_clip_folder(path)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.processor = CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        self.batch_size = batch_size

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[N, D]`` normalised CLIP image embeddings (the projected pooled vision output)."""
        device, out = _module_device(self.model), []
        for batch in _batches(list(images), self.batch_size):
            pixels = self.processor([im.convert("RGB") for im in batch], return_tensors="pt")["pixel_values"]
            # Spelled out rather than get_image_features, whose return type changed in transformers 5.
            pooled = self.model.vision_model(pixel_values=pixels.to(device)).pooler_output
            out.append(self.model.visual_projection(pooled))
        return F.normalize(torch.cat(out).float().cpu(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` normalised CLIP text embeddings (the projected end-of-text token state)."""
        device, out = _module_device(self.model), []
        max_length = self.model.config.text_config.max_position_embeddings
        for batch in _batches(list(texts), self.batch_size):
            tokens = self.tokenizer(list(batch), padding=True, truncation=True, max_length=max_length,
                                    return_tensors="pt").to(device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
            out.append(self.model.text_projection(pooled))
        return F.normalize(torch.cat(out).float().cpu(), dim=-1)


def dino_preprocess(image: Image.Image, crop: int = 224) -> torch.Tensor:
    """DINO's evaluation transform with PIL and numpy: short side to ``crop * 8 / 7`` (256 for 224, bicubic),
    centre ``crop x crop``, ImageNet normalisation. Returns ``[3, crop, crop]`` float32.

    Sizes and offsets follow torchvision's ``Resize(int)`` (long side truncated) and ``CenterCrop`` (offsets
    rounded), so the pixels match DINO's own pipeline.
    """
    image = image.convert("RGB")
    resize = crop * 8 // 7
    w, h = image.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    image = image.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class DinoEmbedder:
    """DINO ViT-S/16 embeddings: the final-layer-normed CLS token of ``facebook/dino-vits16``, L2-normalised.

    This is the feature DINO itself evaluates with (``model(x)`` returns the normed CLS token) and the one
    DreamBooth's DINO metric uses. The folder must hold ``config.json`` and ``model.safetensors`` or
    ``pytorch_model.bin``; its ``preprocessor_config.json`` is not used, because it squashes images to 224x224
    instead of DINO's resize-256 / centre-crop-224.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        from transformers import ViTModel

        folder = check_dino_folder(path)
        # DINO trains no pooler head (pooler weights in a converted folder are not DINO's): we read the CLS state.
        self.model = ViTModel.from_pretrained(folder, add_pooling_layer=False, local_files_only=True)
        self.model = self.model.to(device).eval()
        self.crop = int(self.model.config.image_size)
        self.batch_size = batch_size

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[N, D]`` normalised CLS embeddings (D = 384 for ViT-S/16)."""
        device, out = _module_device(self.model), []
        for batch in _batches(list(images), self.batch_size):
            pixels = torch.stack([dino_preprocess(im, self.crop) for im in batch]).to(device)
            out.append(self.model(pixel_values=pixels).last_hidden_state[:, 0])
        return F.normalize(torch.cat(out).float().cpu(), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018), v0.1
# with the AlexNet trunk, written here because the lpips package and torchvision's AlexNet import torchvision.

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
LPIPS_LIN_FILE = "alex.pth"
LPIPS_CHANNELS = (64, 192, 384, 256, 256)
# LPIPS v0.1's ScalingLayer: maps [-1, 1] inputs to roughly the ImageNet-normalised range AlexNet was trained on.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class AlexNetFeatures(nn.Module):
    """The convolutional trunk of torchvision's AlexNet (Krizhevsky 2014, "One weird trick"), with its layer
    indices, so torchvision's ``features.N.*`` keys load by name. Returns the outputs of the 5 ReLUs, the
    activations LPIPS compares (its ``relu1..relu5`` slices; the last max-pool is never used)."""

    TAPS = (1, 4, 7, 9, 11)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.TAPS:
                taps.append(x)
        return taps


class NetLinLayer(nn.Module):
    """LPIPS' learned channel weights ``w_l``: a bias-free 1x1 conv to one channel. ``model.0`` is the dropout
    used in training (identity in eval), kept so the released keys ``linL.model.1.weight`` load by name."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LpipsHeads(nn.Module):
    """``lin0..lin4``: the layout of the lpips package's ``weights/v0.1/alex.pth``."""

    def __init__(self) -> None:
        super().__init__()
        for index, channels in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{index}", NetLinLayer(channels))


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # LPIPS' normalize_tensor: divide by (norm + eps), not max(norm, eps), to match the released numbers.
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LpipsNetwork(nn.Module):
    """LPIPS distance, Zhang et al. 2018 Eq. 1:
    ``d(x, x0) = sum_l 1/(H_l W_l) sum_{h,w} || w_l * (y^l_hw - y0^l_hw) ||^2`` where ``y^l`` are the AlexNet
    activations of layer ``l`` unit-normalised over channels and ``w_l`` the learned channel weights. As in the
    released code, the weights multiply the squared difference (``sum_c w_lc d_c^2``), the form ``alex.pth`` holds.
    Inputs are ``[N, 3, H, W]`` in [-1, 1] (both of the same size); returns ``[N]`` distances.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = AlexNetFeatures()
        self.lins = LpipsHeads()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"LPIPS compares images of the same size; got {list(a.shape)} and {list(b.shape)}")
        # One trunk pass over both batches: half the kernel launches, same numbers.
        feats = self.net((torch.cat([a, b]) - self.shift) / self.scale)
        total = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for lin, f in zip(self.lins.children(), feats):
            fa, fb = f.chunk(2)
            total = total + lin((_unit_channels(fa) - _unit_channels(fb)) ** 2).mean(dim=(1, 2, 3))
        return total


def default_lin_path() -> Path | None:
    """``lpips/weights/v0.1/alex.pth`` inside an installed lpips package, found without importing it (its
    ``__init__`` imports torchvision); ``None`` when the package is not installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / LPIPS_LIN_FILE


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    # Not ldm.weights.checkpoint.read_checkpoint: it memory-maps, which only works for zip-format files, and the lpips
    # package's alex.pth is in the legacy pickle format. weights_only still refuses pickled code.
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named, in one line
        first = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a readable PyTorch weights file (truncated download?): "
                              f"{type(exc).__name__}: {first}") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _load_strict(module: nn.Module, found: dict[str, torch.Tensor], path: Path) -> None:
    # Every expected key present with the expected shape, said in one line before anything is copied.
    expected = module.state_dict()
    missing = [k for k in expected if k not in found]
    wrong = [k for k in expected if k in found and found[k].shape != expected[k].shape]
    if missing or wrong:
        parts = [f"{len(missing)} keys missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{k} is {list(found[k].shape)}, expected {list(expected[k].shape)}" for k in wrong[:2]]
        raise CheckpointError(f"{path}: not the LPIPS AlexNet weights this loader expects: {'; '.join(parts)}")
    module.load_state_dict({k: found[k] for k in expected}, strict=True)


class Lpips:
    """LPIPS v0.1 (AlexNet) distances between images, from weight files the user provides.

    ``weights_dir`` must hold torchvision's AlexNet file ``alexnet-owt-7be5be79.pth`` (from
    download.pytorch.org; only its ``features.*`` tensors are used). The linear weights ``alex.pth`` are taken
    from ``lin_path`` if given, else from ``weights_dir/alex.pth``, else from an installed lpips package
    (``pip install lpips --no-deps`` ships them as ``lpips/weights/v0.1/alex.pth``).
    """

    def __init__(self, weights_dir: str | Path, lin_path: str | Path | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        folder = require_files(weights_dir, [ALEXNET_FILE], "LPIPS weights folder",
                               f"download {ALEXNET_URL} into it")
        if lin_path is None:
            local, packaged = folder / LPIPS_LIN_FILE, default_lin_path()
            lin_path = local if local.is_file() or packaged is None else packaged
        lin_path = Path(lin_path).expanduser()
        if not lin_path.is_file():
            raise ModelFilesError(
                f"LPIPS linear weights {lin_path}: file not found; run `pip install lpips --no-deps` (it ships "
                f"lpips/weights/v0.1/{LPIPS_LIN_FILE}) or copy that file into {folder}")
        self.network = LpipsNetwork()
        _load_strict(self.network.net, _read_weights(folder / ALEXNET_FILE), folder / ALEXNET_FILE)
        _load_strict(self.network.lins, _read_weights(lin_path), lin_path)
        self.network = self.network.to(device).eval().requires_grad_(False)
        self.lin_path = lin_path
        self.batch_size = batch_size

    @staticmethod
    def _as_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
        # PIL images go through the training loader's conversion: RGB, [3, H, W], [-1, 1] as LPIPS expects.
        return to_tensor(image) if isinstance(image, Image.Image) else image

    @torch.inference_mode()
    def distances(self, images_a: Sequence[Image.Image | torch.Tensor],
                  images_b: Sequence[Image.Image | torch.Tensor]) -> torch.Tensor:
        """``[N]`` LPIPS distances between ``images_a[i]`` and ``images_b[i]`` (PIL, or ``[3, H, W]`` tensors in
        [-1, 1]); images in one batch must share a size."""
        if len(images_a) != len(images_b):
            raise ValueError(f"got {len(images_a)} and {len(images_b)} images; LPIPS compares them in pairs")
        device, out = self.network.shift.device, []
        for start in range(0, len(images_a), self.batch_size):
            stop = start + self.batch_size
            a = torch.stack([self._as_tensor(im) for im in images_a[start:stop]]).to(device)
            b = torch.stack([self._as_tensor(im) for im in images_b[start:stop]]).to(device)
            out.append(self.network(a, b).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def distance(self, image_a: Image.Image | torch.Tensor, image_b: Image.Image | torch.Tensor) -> float:
        """The LPIPS distance between two images of the same size; 0 for identical images."""
        return float(self.distances([image_a], [image_b])[0])
