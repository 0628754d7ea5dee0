"""FLUX.1 in ``--suite dreambooth`` (``--config tiny-flux`` / ``flux-dev``): its rows, and what a FLUX model needs
before the suite can build it without any file.

The rows (``flux_variants``): the LoRA recipe of flux1-dev-dreambooth-lora.yaml with its frozen weights in fp32
(``FLUX_RECIPE``: rank 16, gradient checkpointing, 8-bit AdamW), then that recipe with one memory switch each:
``+bf16`` (``frozen_dtype: bf16``: the frozen transformer, autoencoder and text encoders stored in bf16, under bf16
autocast as main.py requires), ``+fp8`` (``frozen_dtype: fp8``: the frozen transformer's linear weights in float8
with a per-tensor scale, the rest in bf16), ``+fp8t5`` (``text_encoder_fp8``: T5's and CLIP's linear weights in
float8), ``+cached`` (latents and T5/CLIP outputs computed once before the steps; on CUDA the autoencoder and text
encoders then leave the GPU), ``+swapN`` (``blocks_to_swap: N``: the first N of the transformer's blocks kept in
host memory until they run; there is nothing to swap to on a CPU, so there such a row is the recipe's, and the
table says so), and a full fine-tune of the transformer (``unet+ckpt+8bit``: kind ``unet`` is the denoising network,
here FLUX's transformer; its text encoders are frozen).

What the configs leave to the user, the suite provides: a T5 tokenizer (``stand_in_t5_tokenizer``: prompts are
padded to the embedder's ``max_length`` whatever the tokenizer, so a small SentencePiece model costs the encoder
what T5's own does) and random weights made quickly (``quick_random_init``: FLUX.1-dev's 17 B parameters are drawn
one number at a time by the CPU generator otherwise, about two minutes per row). ``--width`` narrows the
transformer (its heads keep their width), so that the memory the switches save shows in a CPU's peak RSS.
"""
from __future__ import annotations

import io
import itertools
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

#: flux1-dev-dreambooth-lora.yaml's LoRA with its frozen weights in fp32 and nothing cached: the reference row
#: every memory switch is added to (the yaml itself is ``FLUX_RECIPE + "+bf16+cached"``).
FLUX_RECIPE = "lora16+ckpt+8bit"
FLUX_SWITCHES = ("bf16", "fp8", "fp8t5", "cached")
FLUX_FULL = "unet+ckpt+8bit"
#: T5's special ids, which our ``T5Tokenizer`` checks (pad 0, eos 1, unk 2, no bos).
T5_IDS = {"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1}
#: ``quick_random_init``: the bank a large tensor's random values are tiled from, and from which size on.
BANK = 1 << 20
QUICK_FROM = 1 << 22


def block_count(config: Any) -> int:
    """The transformer's double plus single blocks (FLUX.1: 19 + 38), which ``blocks_to_swap`` counts."""
    net = config.model.params.unet_config.params
    return int(net.depth) + int(net.depth_single_blocks)


def flux_variants(config: Any) -> tuple[str, ...]:
    """``--variants all`` for a FLUX config: the recipe, each switch on it, the most blocks swapped that the
    config allows (all but one), and the full fine-tune."""
    swap = f"swap{block_count(config) - 1}"
    return (FLUX_RECIPE, *(f"{FLUX_RECIPE}+{s}" for s in (*FLUX_SWITCHES, swap)), FLUX_FULL)


def prepare_config(config: Any, width: Optional[int], folder: Path) -> None:
    """In place: a stand-in T5 tokenizer where the config names none (written to ``folder``), and the
    transformer's hidden size ``width`` (its heads keep the config's head width, and with it the rotary axes)."""
    for embedder in config.model.params.conditioner_config.params.emb_models:
        params = embedder.get("params") or {}
        if str(embedder.target).endswith("FrozenT5Embedder") and not params.get("tokenizer_path"):
            embedder.params.tokenizer_path = str(stand_in_t5_tokenizer(folder))
    if width:
        net = config.model.params.unet_config.params
        head = int(net.hidden_size) // int(net.num_heads)
        if width % head:
            raise ValueError(f"--width {width}: not a multiple of the config's head width {head}")
        net.hidden_size, net.num_heads = width, width // head


def stand_in_t5_tokenizer(folder: Path, vocab_size: int = 256) -> Path:
    """``folder/spiece.model``: a SentencePiece unigram model with T5's special ids, trained on made-up prompts
    (the DreamBooth captions' words and syllable nonsense), for the configs' ``tokenizer_path: null``."""
    import sentencepiece
    rng = random.Random(0)
    syllables = "ka ri to me su na lo pe di gu ba ve zo chi sha tre pho gra".split()
    words = "a photo of sks dog in the snow on beach with red hat painting".split()
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                             vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
                                             minloglevel=2, **T5_IDS)
    path = folder / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


@contextmanager
def quick_random_init(seed: int = 0) -> Iterator[None]:
    """While building a model: ``Tensor.uniform_`` and ``Tensor.normal_`` (what ``nn.init`` calls) fill tensors of
    ``QUICK_FROM`` elements or more from a seeded bank of ``BANK`` draws, scaled to the asked range, instead of
    drawing each number. The CPU generator runs on one core at about 10^8 numbers a second, which made the random
    FLUX.1-dev of every row a two-minute build; tiling is a memory copy. The values keep each initialiser's
    distribution and repeat every ``BANK`` elements, which time and memory do not notice; smaller tensors (all of
    the tiny models') draw as usual. Both halves of a comparison get the same weights, as they are built alike."""
    import torch
    g = torch.Generator().manual_seed(seed)
    banks = {"uniform_": torch.rand(BANK, generator=g), "normal_": torch.randn(BANK, generator=g)}
    saved = {name: torch.Tensor.__dict__.get(name) for name in banks}
    draws = itertools.count(1)

    def tiled(tensor: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        flat = tensor.view(-1)
        values = values.roll(next(draws) * 7919)  # each tensor from another point of the bank
        for start in range(0, flat.numel(), BANK):
            n = min(BANK, flat.numel() - start)
            flat[start:start + n].copy_(values[:n])
        return tensor

    def wrap(name: str, keys: tuple[tuple[str, float], ...], scale: Any) -> Any:
        plain = getattr(torch._C.TensorBase, name)

        def fill(tensor: torch.Tensor, *args: float, generator: Any = None, **kwargs: float) -> torch.Tensor:
            if tensor.numel() < QUICK_FROM or not tensor.is_contiguous() or tensor.device.type == "meta":
                return plain(tensor, *args, generator=generator, **kwargs)
            a, b = (args[i] if len(args) > i else kwargs.get(k, default) for i, (k, default) in enumerate(keys))
            return tiled(tensor, scale(banks[name], a, b))
        return fill

    torch.Tensor.uniform_ = wrap("uniform_", (("from", 0.0), ("to", 1.0)), lambda u, low, high: u * (high - low) + low)
    torch.Tensor.normal_ = wrap("normal_", (("mean", 0.0), ("std", 1.0)), lambda n, mean, std: n * std + mean)
    try:
        yield
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def flux_notes(cuda: bool) -> list[str]:
    """The lines ``describe`` adds for FLUX rows."""
    swap = ("swapN: blocks_to_swap N (the first N blocks in pinned host memory, fetched ahead on a side stream)" if cuda
            else "swapN: blocks_to_swap N, which needs an accelerator: on a CPU no block moves, the row is the "
                 "recipe's, and its label says so")
    return [
        "Step (Lightning 2's order): configure_model (fp8, block swap) before the model moves to its device, "
        "shared_step (autoencoder, CLIP + T5, the transformer's velocity at t from flux_shift, prior-preservation "
        "loss), zero_grad(set_to_none), backward, optimizer step, LR scheduler step.",
        f"{FLUX_RECIPE}: rank-16 LoRA on every attention and MLP projection, gradient checkpointing, AdamW8bit, frozen "
        f"weights fp32; bf16: frozen weights in bf16 under bf16 autocast; fp8: the frozen transformer's linear "
        f"weights in float8_e4m3fn with a per-tensor scale (bf16 elsewhere, bf16 autocast); fp8t5: T5's and CLIP's "
        f"linear weights in float8; cached: latents and T5/CLIP outputs computed once before the steps; {swap}; "
        f"unet: the transformer fully trained.",
        "frozen weights: bytes of the frozen parameters and buffers (autoencoder, text encoders, and the "
        "transformer under LoRA, its adapters not counted), wherever they are; first loss: the first step's loss "
        "(same seeded weights and draws in every row).",
    ]
