"""The CLIP byte-level BPE tokenizer (OpenAI CLIP ``simple_tokenizer``), as used by SD v1's text encoder.

Reproduces the ``openai/clip-vit-large-patch14`` tokenizer: Sennrich et al. BPE over the bytes of
pre-tokenized, cleaned, lower-cased text, with ``</w>`` marking the end of a word, wrapped as
``<|startoftext|> ... <|endoftext|>`` and padded with ``<|endoftext|>`` to the 77-token context.
OpenCLIP's ``tokenize`` (SDXL's second text encoder) is the same except that it pads with id 0 (``pad_token_id=0``).

The merge table is the ``bpe_simple_vocab_16e6.txt.gz`` file shipped inside the ``open_clip_torch``
package. We only read that data file: importing ``open_clip`` itself needs torchvision, which we avoid.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import regex
import torch

try:  # ftfy repairs mojibake before tokenizing; the original falls back to no repair only if it is absent
    import ftfy
except ImportError:  # pragma: no cover - ftfy is a declared dependency
    ftfy = None

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
# The file holds more merges than CLIP uses: 49152 - 256 byte symbols - 2 special tokens (+1 header line).
NUM_MERGES = 49152 - 256 - 2
# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits, other symbol runs.
PRE_TOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def default_bpe_path() -> Path:
    """Path of the merge table inside the installed ``open_clip_torch`` package (not imported, only located).

    ``find_spec`` on a top-level package only resolves its location; it does not run ``open_clip/__init__``.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{BPE_FILENAME} not found: run `pip install open_clip_torch --no-deps`")
    return Path(list(spec.submodule_search_locations)[0]) / BPE_FILENAME


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table.

    Printable Latin-1 bytes map to themselves; the remaining 68 (controls, space, ...) are shifted to
    code points 256+ so that every BPE symbol is a visible, whitespace-free character.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + shift)
            shift += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def read_merges(bpe_path: str | Path) -> list[tuple[str, str]]:
    """The ``NUM_MERGES`` merge rules of the gz file, in priority order (the first line is a header)."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # type: ignore[misc]


def build_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
    """CLIP's token list: 256 byte symbols, the same with ``</w>``, one token per merge, then the 2 specials."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m) for m in merges]
    vocab += [START_OF_TEXT, END_OF_TEXT]
    return vocab


@dataclass
class _Vocab:
    """Everything loaded from one merge file; shared by all tokenizers reading that file."""

    encoder: dict[str, int]
    decoder: dict[int, str]
    ranks: dict[tuple[str, str], int]
    # Memo of word -> space-separated BPE pieces; specials are pre-seeded so they never get split.
    cache: dict[str, str] = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _load_vocab(bpe_path: str) -> _Vocab:
    # Cached per path so that every FrozenCLIPEmbedder (e.g. models built on the meta device) reuses one table.
    merges = read_merges(bpe_path)
    vocab = build_vocab(merges)
    encoder = {tok: i for i, tok in enumerate(vocab)}
    cache = {START_OF_TEXT: START_OF_TEXT, END_OF_TEXT: END_OF_TEXT}
    return _Vocab(encoder, {i: t for t, i in encoder.items()}, {m: i for i, m in enumerate(merges)}, cache)


def clean_text(text: str) -> str:
    """CLIP's ``basic_clean`` + ``whitespace_clean`` + lower-casing.

    ftfy fixes broken unicode, HTML entities are unescaped twice (captions were often double-escaped),
    and all whitespace runs collapse to one space.
    """
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def _pairs(word: Sequence[str]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:]))


class CLIPTokenizer:
    """OpenAI CLIP's BPE tokenizer with SD's fixed-length batching (BOS, ids, EOS, padding to 77).

    ``pad_token_id`` defaults to ``<|endoftext|>`` (49407), as HF's clip-vit-large-patch14 files that SD v1 used;
    OpenCLIP's tokenizer pads with 0 (the id of ``!``), which SDXL's OpenCLIP bigG encoder saw in training.
    """

    def __init__(
        self, bpe_path: str | Path | None = None, max_length: int = 77, pad_token_id: int | None = None
    ) -> None:
        path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `pip install open_clip_torch --no-deps`")
        self.bpe_path = path
        self.max_length = max_length
        self._vocab = _load_vocab(str(path.resolve()))
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_token_id = self._vocab.encoder[START_OF_TEXT]
        self.eos_token_id = self._vocab.encoder[END_OF_TEXT]
        self.pad_token_id = self.eos_token_id if pad_token_id is None else pad_token_id

    @property
    def vocab_size(self) -> int:
        return len(self._vocab.encoder)

    def bpe(self, token: str) -> str:
        """Apply the merges to one pre-token, greedily merging the lowest-ranked adjacent pair first."""
        cached = self._vocab.cache.get(token)
        if cached is not None:
            return cached
        ranks = self._vocab.ranks
        word: tuple[str, ...] = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            bigram = min(_pairs(word), key=lambda p: ranks.get(p, float("inf")))
            if bigram not in ranks:
                break
            word = self._merge(word, bigram)
        out = " ".join(word)
        self._vocab.cache[token] = out
        return out

    @staticmethod
    def _merge(word: tuple[str, ...], bigram: tuple[str, str]) -> tuple[str, ...]:
        # Replace every non-overlapping occurrence of the pair, left to right.
        first, second = bigram
        merged: list[str] = []
        i = 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        return tuple(merged)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS and without truncation."""
        ids: list[int] = []
        for token in PRE_TOKENIZE.findall(clean_text(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self._vocab.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """``[B, max_length]`` ids: BOS, at most ``max_length - 2`` text tokens, EOS, then ``pad_token_id``.

        Truncation keeps EOS as the last token (as HF's ``truncation=True`` and CLIP's ``truncate=True``).
        """
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_token_id] + self.encode(text)[: self.max_length - 2] + [self.eos_token_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out  # type: ignore[return-value]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of ``ids``; ``</w>`` becomes a space, so the result is the cleaned text, not the original."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        text = "".join(self._vocab.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()
