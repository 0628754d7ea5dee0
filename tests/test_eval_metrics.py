"""DreamBooth evaluation: the benchmark file, the metrics on closed-form cases, and the embedders on tiny models.

The embedders are checked with tiny randomly initialised models of the real classes, saved to disk and loaded
back through the wrappers (so the local-file loading is what runs), against transformers' own forward passes;
LPIPS is checked against the lpips package's own code when it is installed (run in a subprocess with
stand-ins for torchvision and scipy, which it imports but does not need for this).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.data.image_loading import ImageError
from ldm.eval.dataset import (DatasetError, class_prompt, parse_prompts_and_classes, prompts_for, real_images,
                              subjects)
from ldm.eval.embedders import (ALEXNET_FILE, ClipEmbedder, DinoEmbedder, Lpips, ModelFilesError,
                                default_lin_path, dino_preprocess)
from ldm.eval.metrics import (clip_i_score, clip_t_score, dino_score, div_score, mean_pairwise_cosine,
                              mean_pairwise_distance, pres_score, prompt_for_clip_t)
from ldm.weights.checkpoint import CheckpointError

from eval_helpers import make_clip_folder, make_dino_folder, make_lpips_files, noise_image

DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "dreambooth"
needs_dataset = pytest.mark.skipif(not DATASET.is_dir(), reason=f"DreamBooth dataset not at {DATASET}")


# --- the benchmark file -----------------------------------------------------------------------------------------

@needs_dataset
def test_real_benchmark_file() -> None:
    subs = subjects(DATASET)
    assert len(subs) == 30 and sum(len(s.images) for s in subs) == 158
    by_name = {s.name: s for s in subs}
    assert by_name["bear_plushie"].class_word == "stuffed animal" and not by_name["bear_plushie"].live
    live = sorted(s.name for s in subs if s.live)
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert all(len(s.prompt_templates) == 25 for s in subs)
    dog, can = by_name["dog"], by_name["can"]
    assert prompts_for(dog, "sks")[0] == "a sks dog in the jungle"
    assert "a sks dog wearing a red hat" in prompts_for(dog, "sks")
    assert prompts_for(can, "sks")[-1] == "a cube shaped sks can"
    assert not any("hat" in p for p in can.prompt_templates)
    # The two lists share the first 10 and the last 5 prompts, and differ in the 10 between.
    assert dog.prompt_templates[:10] == can.prompt_templates[:10]
    assert dog.prompt_templates[20:] == can.prompt_templates[20:]
    assert can.prompt_templates[0] == "a {token} {class_word} in the jungle"
    assert class_prompt(by_name["bear_plushie"]) == "a stuffed animal"
    assert [p.name for p in dog.images] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"]


@needs_dataset
def test_real_images_are_square_crops() -> None:
    can = next(s for s in subjects(DATASET) if s.name == "can")
    images = real_images(can, 32)
    assert len(images) == len(can.images) and all(im.size == (32, 32) and im.mode == "RGB" for im in images)


def test_missing_dataset_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="prompts_and_classes.txt.*google/dreambooth") as info:
        subjects(tmp_path / "nowhere")
    assert "\n" not in str(info.value)


TINY_FILE = """Classes

subject_name,class
toy_a,toy
kitty,cat

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


def test_parse_and_missing_subject_folder(tmp_path: Path) -> None:
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "prompts_and_classes.txt").write_text(TINY_FILE)
    for name in ("toy_a", "kitty"):
        (tmp_path / "dataset" / name).mkdir()
        noise_image(0).save(tmp_path / "dataset" / name / "00.jpg")
    toy, kitty = subjects(tmp_path)
    assert (toy.class_word, toy.live, kitty.live) == ("toy", False, True)
    assert prompts_for(toy, "zwx") == ["a zwx toy in the jungle", "a red zwx toy"]
    assert prompts_for(kitty, "zwx") == ["a zwx cat wearing a red hat"]
    for path in (tmp_path / "dataset" / "kitty").iterdir():
        path.unlink()
    (tmp_path / "dataset" / "kitty").rmdir()
    with pytest.raises(ImageError, match="kitty: folder not found"):
        subjects(tmp_path)


def test_malformed_prompt_names_the_line() -> None:
    broken = TINY_FILE.replace("'a red {0} {1}'", "'a red {0}'")
    with pytest.raises(DatasetError, match=r"prompts_and_classes.txt:13: prompt 'a red \{0\}'"):
        parse_prompts_and_classes(broken)


# --- metrics on closed-form cases -------------------------------------------------------------------------------

def test_cosine_closed_forms() -> None:
    x = torch.tensor([[1.0, 2.0, -3.0]])
    assert mean_pairwise_cosine(x, x) == pytest.approx(1.0)
    assert mean_pairwise_cosine(x, -5 * x) == pytest.approx(-1.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 7.0]])) == pytest.approx(0.0)
    # Un-normalised rows: a -> [.6, .8, 0], [0, 0, 1]; the 2x3 cosine matrix is [[.6, .8, 0], [0, 0, 1]].
    a = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    assert mean_pairwise_cosine(a, b) == pytest.approx(2.4 / 6)
    assert dino_score(a, b) == clip_i_score(a, b) == pytest.approx(0.4)
    # PRES: one real image against two class-prior images, one the same direction, one orthogonal.
    assert pres_score(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])) == pytest.approx(0.5)


def test_clip_t_pairs_each_image_with_its_prompt() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert clip_t_score(images, torch.tensor([[3.0, 0.0], [1.0, 1.0]])) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert clip_t_score(images, torch.tensor([[1.0, 0.0]])) == pytest.approx(0.5)  # one prompt for all
    with pytest.raises(ValueError, match="expected 1 or one per image"):
        clip_t_score(images, torch.ones(3, 2))
    with pytest.raises(ValueError, match="embedding sizes differ"):
        mean_pairwise_cosine(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="non-empty"):
        dino_score(torch.ones(0, 3), torch.ones(2, 3))


def test_prompt_for_clip_t_removes_only_the_identifier() -> None:
    assert prompt_for_clip_t("a sks dog in the snow", "sks") == "a dog in the snow"
    assert prompt_for_clip_t("a cube shaped sks can", "sks") == "a cube shaped can"
    assert prompt_for_clip_t("a photo of sks", "sks") == "a photo of"
    assert prompt_for_clip_t("sks dog, on a sksdog rug", "sks") == "dog, on a sksdog rug"
    assert prompt_for_clip_t("a <v*> toy", "<v*>") == "a toy"
    with pytest.raises(ValueError, match="not a word of the prompt"):
        prompt_for_clip_t("a sksdog in the snow", "sks")


def test_pairwise_distance_counts_each_pair_once() -> None:
    calls: list[tuple[float, float]] = []

    def dist(x: float, y: float) -> float:
        calls.append((x, y))
        return abs(x - y)

    assert mean_pairwise_distance([0.0, 1.0, 3.0], dist) == pytest.approx((1 + 3 + 2) / 3)
    calls.clear()
    mean_pairwise_distance([float(i) for i in range(5)], dist)
    assert len(calls) == 5 * 4 // 2 and len({frozenset(c) for c in calls}) == 10
    # DIV averages the per-prompt means: (1 + (2 + 4 + 2) / 3) / 2.
    assert div_score([[0.0, 1.0], [0.0, 2.0, 4.0]], dist) == pytest.approx((1 + 8 / 3) / 2)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance([1.0], dist)


# --- CLIP --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> ClipEmbedder:
    return ClipEmbedder(make_clip_folder(tmp_path_factory.mktemp("clip")))


def _features(out: object) -> torch.Tensor:
    # get_image_features returns a tensor in transformers 4 and an output with the projection in 5.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clip_images_match_transformers(clip: ClipEmbedder) -> None:
    images = [noise_image(1), noise_image(2, (40, 64)), noise_image(1)]
    emb = clip.embed_images(images)
    assert emb.shape == (3, 8) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert mean_pairwise_cosine(emb[:1], emb[2:]) == pytest.approx(1.0, abs=1e-6)
    pixels = clip.processor(images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 32, 32)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(_features(clip.model.get_image_features(pixel_values=pixels)))
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)


def test_clip_texts_match_transformers_and_ignore_padding(clip: ClipEmbedder) -> None:
    texts = ["a dog", "a dog in the snow with a mountain in the background"]
    emb = clip.embed_texts(texts)
    assert emb.shape == (2, 8) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-6)
    # Alone, "a dog" has no padding; batched with a longer prompt it does, and must embed the same.
    torch.testing.assert_close(clip.embed_texts(texts[:1])[0], emb[0], atol=1e-5, rtol=1e-5)
    ids = clip.tokenizer(texts[1:])["input_ids"]
    assert ids[0][0] == clip.model.config.text_config.bos_token_id
    with torch.no_grad():
        expected = _features(clip.model.get_text_features(input_ids=torch.tensor(ids)))
    torch.testing.assert_close(emb[1:], torch.nn.functional.normalize(expected), atol=1e-5, rtol=1e-5)


def test_clip_missing_files_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesError, match="folder not found; download all files of .*clip-vit-base-patch32"):
        ClipEmbedder(tmp_path / "clip")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(ModelFilesError) as info:
        ClipEmbedder(tmp_path)
    assert "missing model.safetensors or pytorch_model.bin, preprocessor_config.json, merges.txt;" in str(info.value)
    assert "\n" not in str(info.value)


# --- DINO --------------------------------------------------------------------------------------------------------

def test_dino_preprocess_is_resize_256_crop_224() -> None:
    flat = dino_preprocess(Image.new("RGB", (300, 200), (10, 128, 250)))
    assert flat.shape == (3, 224, 224)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.tensor([10, 128, 250]) / 255 - mean) / std
    torch.testing.assert_close(flat[:, 100, 100], expected, atol=1e-5, rtol=0)
    # 700x350 -> 512x256 -> the central 224 columns: black left half, white right half of the crop.
    split = Image.new("RGB", (700, 350), (255, 255, 255))
    split.paste((0, 0, 0), (0, 0, 350, 350))
    crop = dino_preprocess(split)
    assert (crop[:, :, :110] < 0).all() and (crop[:, :, 114:] > 0).all()


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dino_folder(tmp_path_factory.mktemp("dino"))


def test_dino_is_the_normalised_cls_token(dino_folder: Path) -> None:
    dino = DinoEmbedder(dino_folder)
    images = [noise_image(3), noise_image(4, (64, 40)), noise_image(3)]
    emb = dino.embed_images(images)
    assert dino.crop == 32 and emb.shape == (3, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert mean_pairwise_cosine(emb[:1], emb[2:]) == pytest.approx(1.0, abs=1e-6)
    pixels = torch.stack([dino_preprocess(im, 32) for im in images])
    with torch.no_grad():
        cls = dino.model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(emb, torch.nn.functional.normalize(cls), atol=1e-5, rtol=1e-5)


def test_dino_missing_weights_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFilesError, match=r"missing model.safetensors or pytorch_model.bin; .*dino-vits16"):
        DinoEmbedder(tmp_path)


# --- LPIPS -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_lpips_files(tmp_path_factory.mktemp("lpips"))


@pytest.fixture(scope="module")
def lpips(lpips_files: tuple[Path, Path]) -> Lpips:
    return Lpips(*lpips_files)


def test_lpips_properties(lpips: Lpips) -> None:
    a, b, c = noise_image(5, (64, 64)), noise_image(6, (64, 64)), noise_image(7, (64, 64))
    assert lpips.distance(a, a) == 0.0
    d_ab, d_ba = lpips.distance(a, b), lpips.distance(b, a)
    assert d_ab > 0 and d_ab == pytest.approx(d_ba, rel=1e-6)
    batched = lpips.distances([a, b, a], [b, c, c])
    torch.testing.assert_close(batched, torch.tensor([lpips.distance(a, b), lpips.distance(b, c),
                                                      lpips.distance(a, c)]), atol=1e-6, rtol=1e-5)
    assert div_score([[a, b, c]], lpips.distance) == pytest.approx(float(batched.mean()), rel=1e-5)


# The lpips package's own LPIPS, given the same weights. torchvision's AlexNet is rebuilt here from its source
# layout (features only) and scipy's zoom, used only by lpips' trainer, is stubbed.
UPSTREAM = """
import json, sys, types, torch
from torch import nn
folder, lins, inputs = sys.argv[1:]
def alexnet(**kwargs):
    sd = torch.load(folder + "/alexnet-owt-7be5be79.pth")
    m = nn.Module()
    m.features = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2), nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2))
    m.features.load_state_dict({k[9:]: v for k, v in sd.items() if k.startswith("features.")})
    return m
tv, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
models.alexnet, tv.models = alexnet, models
scipy, ndimage = types.ModuleType("scipy"), types.ModuleType("scipy.ndimage")
ndimage.zoom, scipy.ndimage = None, ndimage
sys.modules.update({"torchvision": tv, "torchvision.models": models, "scipy": scipy, "scipy.ndimage": ndimage})
import lpips
model = lpips.LPIPS(net="alex", version="0.1", model_path=lins, verbose=False)
a, b = torch.load(inputs)
with torch.no_grad():
    print(json.dumps(model(a, b).flatten().tolist()))
"""


@pytest.mark.skipif(default_lin_path() is None, reason="lpips package not installed (pip install lpips --no-deps)")
def test_lpips_matches_the_lpips_package(lpips: Lpips, lpips_files: tuple[Path, Path], tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 64, 80, generator=g) * 2 - 1, torch.rand(3, 3, 64, 80, generator=g) * 2 - 1
    torch.save((a, b), tmp_path / "inputs.pt")
    run = subprocess.run([sys.executable, "-c", UPSTREAM, str(lpips_files[0]), str(lpips_files[1]),
                          str(tmp_path / "inputs.pt")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    expected = torch.tensor(json.loads(run.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(lpips.distances(list(a), list(b)), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(default_lin_path() is None, reason="lpips package not installed (pip install lpips --no-deps)")
def test_packaged_lin_weights_are_found_without_importing_lpips(lpips_files: tuple[Path, Path]) -> None:
    path = default_lin_path()
    assert path is not None and path.is_file() and "lpips" not in sys.modules
    with_package_lins = Lpips(lpips_files[0])  # no lin_path and no alex.pth in the folder: the package's file
    assert with_package_lins.lin_path == path and "lpips" not in sys.modules
    released = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(released) == sorted(f"lin{i}.model.1.weight" for i in range(5))
    for key, value in with_package_lins.network.lins.state_dict().items():
        assert torch.equal(value, released[key]) and (value >= 0).all()


def test_lpips_missing_or_wrong_files(lpips_files: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelFilesError, match=r"missing alexnet-owt-7be5be79.pth; download https://download"):
        Lpips(tmp_path)
    folder, _ = lpips_files
    with pytest.raises(ModelFilesError, match="pip install lpips --no-deps"):
        Lpips(folder, lin_path=tmp_path / "alex.pth")
    torch.save({f"lin{i}.model.1.weight": torch.ones(1, 8, 1, 1) for i in range(5)}, tmp_path / "vgg.pth")
    with pytest.raises(CheckpointError, match=r"lin0.model.1.weight is \[1, 8, 1, 1\], expected \[1, 64, 1, 1\]"):
        Lpips(folder, lin_path=tmp_path / "vgg.pth")
    (tmp_path / ALEXNET_FILE).write_bytes(b"<html>rate limited</html>")  # what a failed download leaves
    with pytest.raises(CheckpointError, match="alexnet-owt-7be5be79.pth: not a readable PyTorch weights file"):
        Lpips(tmp_path)
