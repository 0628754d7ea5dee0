"""DreamBooth data: image decoding edge cases, captions, the dataset's pairing and flips, the datamodule.

Every image is drawn here with Pillow, so the expected pixels are known from how it was drawn (or from
Pillow's own crop + resize of the in-memory original), never from the code under test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.dreambooth import DreamBoothDataset, check_identifier
from ldm.data.image_loading import ImageError, find_images, load_caption, load_image, to_tensor
from ldm.util import instantiate_from_config

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def thirds(w: int = 200, h: int = 100) -> Image.Image:
    """Left third red, middle green, right third blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 3] = RED
    a[:, w // 3: 2 * w // 3] = GREEN
    a[:, 2 * w // 3:] = BLUE
    return Image.fromarray(a)


def halves(w: int, h: int, first: tuple, second: tuple, mode: str = "RGB", vertical: bool = False) -> Image.Image:
    """``first`` on the left (or top, if ``vertical``) half, ``second`` on the other."""
    img = Image.new(mode, (w, h), second)
    img.paste(first, (0, 0, w, h // 2) if vertical else (0, 0, w // 2, h))
    return img


def pixel(img: Image.Image, x: int, y: int) -> np.ndarray:
    return np.asarray(img, dtype=np.int32)[y, x]


def close(img: Image.Image, x: int, y: int, rgb: tuple, tol: int = 3) -> bool:
    return bool(np.abs(pixel(img, x, y) - np.array(rgb)).max() <= tol)


def one_line_error(exc: pytest.ExceptionInfo, name: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and name in msg, msg


# ---- decoding --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, tol", [(".png", 1), (".bmp", 1), (".webp", 40), (".jpg", 40)])
def test_formats_load_as_centre_square(tmp_path, suffix, tol):
    src = thirds()
    path = tmp_path / f"img{suffix}"
    src.save(path, **({"quality": 95} if suffix in (".jpg", ".webp") else {}))
    out = load_image(path, 64)
    assert out.mode == "RGB" and out.size == (64, 64)
    a = np.asarray(out, dtype=np.int32)
    green = (a[..., 1] > 200) & (a[..., 0] < 60) & (a[..., 2] < 60)
    assert green.mean() > 0.5  # the centre square is x in [50, 150): 2/3 of it is the green third
    assert close(out, 32, 32, GREEN, tol) and close(out, 1, 32, RED, tol) and close(out, 62, 32, BLUE, tol)
    reference = src.crop((50, 0, 150, 100)).resize((64, 64), Image.Resampling.LANCZOS)
    diff = np.abs(a - np.asarray(reference, dtype=np.int32))
    if suffix in (".png", ".bmp"):  # lossless: the same resample as Pillow's own crop-then-resize
        assert diff.max() <= 1
    else:  # lossy codecs blur the colour edges only
        assert diff.mean() < 8


def test_exif_orientation_is_applied(tmp_path):
    # Stored 80 wide x 40 high, red on top. Orientation 6 = "rotate 90 degrees clockwise to display":
    # the displayed image is 40 x 80 with the red half on the right.
    img = halves(80, 40, RED, BLUE, vertical=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    out = load_image(path, 32)
    assert close(out, 28, 16, RED, 40) and close(out, 3, 16, BLUE, 40)
    assert close(out, 28, 2, RED, 40) and close(out, 28, 30, RED, 40)  # the red half spans top to bottom


def test_mpo_uses_first_frame(tmp_path):
    path = tmp_path / "stereo.mpo"
    try:
        Image.new("RGB", (48, 48), RED).save(path, format="MPO", save_all=True,
                                             append_images=[Image.new("RGB", (48, 48), BLUE)])
    except (KeyError, OSError, ValueError) as exc:
        pytest.skip(f"this Pillow cannot write MPO files ({exc!r})")
    with Image.open(path) as check:
        assert check.format == "MPO" and check.n_frames == 2
    assert close(load_image(path, 32), 16, 16, RED, 10)


def test_alpha_palette_and_cmyk(tmp_path):
    # RGBA: opaque red left, fully transparent black right -> white there (not black).
    halves(40, 40, (255, 0, 0, 255), (0, 0, 0, 0), mode="RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png", 40)
    assert close(out, 5, 20, RED, 0) and close(out, 35, 20, WHITE, 0)
    # LA: half-transparent black over white is mid grey.
    Image.new("LA", (40, 40), (0, 128)).save(tmp_path / "la.png")
    assert close(load_image(tmp_path / "la.png", 40), 20, 20, (127, 127, 127), 1)
    # Palette: index 1 is an odd colour, index 0 is the transparent one.
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.paste(0, (20, 0, 40, 40))
    pal.save(tmp_path / "pal.png", transparency=0)
    out = load_image(tmp_path / "pal.png", 40)
    assert close(out, 5, 20, (10, 200, 30), 0) and close(out, 35, 20, WHITE, 0)
    pal.save(tmp_path / "pal_opaque.png")
    assert close(load_image(tmp_path / "pal_opaque.png", 40), 35, 20, (0, 0, 0), 0)
    # CMYK: no cyan, full magenta + yellow, no black is red.
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as check:
        assert check.mode == "CMYK"
    assert close(load_image(tmp_path / "cmyk.jpg", 40), 20, 20, RED, 30)


def test_greyscale_modes(tmp_path):
    # 16-bit: 65535 is white and 32768 is mid grey (32768 / 257 = 127.5), not both clipped to 255.
    halves(40, 40, 65535, 32768, mode="I;16").save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode.startswith("I")
    out = load_image(tmp_path / "deep.png", 40)
    assert close(out, 5, 20, WHITE, 0) and close(out, 35, 20, (128, 128, 128), 1)
    Image.new("L", (40, 40), 100).save(tmp_path / "grey.png")
    assert close(load_image(tmp_path / "grey.png", 40), 20, 20, (100, 100, 100), 0)
    halves(40, 40, 1, 0, mode="1").save(tmp_path / "bits.png")
    out = load_image(tmp_path / "bits.png", 40)
    assert close(out, 5, 20, WHITE, 0) and close(out, 35, 20, (0, 0, 0), 0)


def test_to_tensor_range():
    t = to_tensor(halves(4, 4, WHITE, (0, 0, 0)))
    assert t.shape == (3, 4, 4) and t.dtype == torch.float32
    assert t[:, :, 0].eq(1).all() and t[:, :, 3].eq(-1).all()


# ---- errors: one line naming the file ----------------------------------------------------------------

def test_bad_files_raise_one_line(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (tmp_path / "empty.jpg").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (10, 30), RED).save(tmp_path / "tiny.png")
    for name in ("corrupt.png", "empty.jpg", "truncated.jpg", "tiny.png"):
        with pytest.raises(ImageError) as exc:
            load_image(tmp_path / name, 64)
        one_line_error(exc, name)
    with pytest.raises(ImageError, match="empty file"):
        load_image(tmp_path / "empty.jpg", 64)
    with pytest.raises(ImageError, match=r"10x30.*at least 16"):  # default minimum: size // 4
        load_image(tmp_path / "tiny.png", 64)
    assert load_image(tmp_path / "tiny.png", 64, min_size=8).size == (64, 64)


def test_folder_errors_and_listing(tmp_path):
    with pytest.raises(ImageError) as exc:
        find_images(tmp_path / "nope", "--data_root")
    one_line_error(exc, "nope")
    assert "--data_root" in str(exc.value) and "folder not found" in str(exc.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    (empty / ".hidden.png").write_bytes(b"")
    with pytest.raises(ImageError) as exc:
        find_images(empty, "--reg_data_root")
    one_line_error(exc, "empty")
    assert "--reg_data_root" in str(exc.value) and "no images" in str(exc.value)
    for name in ("b.PNG", "a.jpeg", "c.heic", "a.txt"):
        (empty / name).write_bytes(b"x")
    (empty / "sub").mkdir()
    (empty / "sub" / "d.png").write_bytes(b"x")
    assert [p.name for p in find_images(empty, "--data_root")] == ["a.jpeg", "b.PNG"]


def test_captions(tmp_path):
    img = tmp_path / "a.png"
    assert load_caption(img) is None
    (tmp_path / "a.txt").write_text("  a sks dog\non the beach \n")
    assert load_caption(img) == "a sks dog on the beach"
    (tmp_path / "a.txt").write_text(" \n")
    with pytest.raises(ImageError) as exc:
        load_caption(img)
    one_line_error(exc, "a.txt")


# ---- the dataset -------------------------------------------------------------------------------------------

def make_folder(path, colours, size: int = 40):
    """One image per colour, each with a white marker in the top-left corner so flips are visible."""
    path.mkdir()
    for k, colour in enumerate(colours):
        img = Image.new("RGB", (size + 8 * k, size), colour)  # varying widths: the crop must still be square
        img.paste(WHITE, (0, 0, size // 4, size // 4))
        img.save(path / f"{k:02d}.png")
    return path


def test_dataset_captions_templates_and_bad_file(tmp_path):
    subj = make_folder(tmp_path / "subj", [RED, GREEN])
    (subj / "01.txt").write_text("sks toy on a table")
    reg = make_folder(tmp_path / "reg", [BLUE])
    ds = DreamBoothDataset(subj, "sks", "stuffed  animal", reg_data_root=reg, size=32, flip_p=0)
    assert ds.captions == ["photo of a sks stuffed animal", "sks toy on a table"]
    assert ds.reg_captions == ["photo of a stuffed animal"]
    ds = DreamBoothDataset(subj, "sks", "stuffed animal", size=32, subject_template="a {token} {class_word}, 4k")
    assert ds.captions[0] == "a sks stuffed animal, 4k"
    with pytest.raises(ValueError, match="clas_word"):
        DreamBoothDataset(subj, "sks", "dog", size=32, subject_template="{token} {clas_word}")
    (subj / "02.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageError) as exc:  # stops in __init__, before any training step
        DreamBoothDataset(subj, "sks", "dog", size=32)
    one_line_error(exc, "02.jpg")


def test_dataset_length_pairing_and_flips(tmp_path):
    colours = [RED, GREEN, BLUE]
    subj = make_folder(tmp_path / "subj", colours)
    reg = make_folder(tmp_path / "reg", [(k * 40, 100, 200) for k in range(5)])
    assert len(DreamBoothDataset(subj, "sks", "dog", size=32, repeats=4)) == 12
    ds = DreamBoothDataset(subj, "sks", "dog", reg_data_root=reg, size=32, repeats=4, reg_repeats=2, flip_p=0)
    assert len(ds) == 10  # min(3 * 4, 5 * 2)
    assert len(DreamBoothDataset(subj, "sks", "dog", reg_data_root=reg, size=32, repeats=1, reg_repeats=1)) == 3
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == item["reg_image"].shape == (3, 32, 32)
        assert item["caption"] == "photo of a sks dog" and item["reg_caption"] == "photo of a dog"
        centre = (item["image"][:, 20, 16] + 1) * 127.5  # away from the white corner marker
        assert torch.allclose(centre, torch.tensor(colours[i % 3], dtype=torch.float32), atol=1)
    with pytest.raises(IndexError):
        ds[len(ds)]
    # flip_p=0: every draw is the same, unflipped image; flip_p=1: always the mirror image.
    unflipped = to_tensor(load_image(subj / "00.png", 32))
    assert all(torch.equal(ds[0]["image"], unflipped) for _ in range(5))
    ds.flip_p = 1.0
    assert torch.equal(ds[0]["image"], unflipped.flip(-1))
    assert ds[0]["image"][:, 2, 30].eq(1).all()  # the top-left marker is now top-right
    # flip_p=0.5 follows torch's RNG: the same seed gives the same flips.
    ds.flip_p = 0.5
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(torch.stack([ds[0]["image"] for _ in range(16)]))
    assert torch.equal(draws[0], draws[1])
    flipped = draws[0][:, :, 2, 30].eq(1).all(dim=1)
    assert 0 < int(flipped.sum()) < 16


# ---- the identifier and the datamodule -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from ldm.modules.encoders.tokenizer import CLIPTokenizer
    return CLIPTokenizer()


def test_check_identifier(tokenizer):
    assert check_identifier("sks", tokenizer) == []
    (warning,) = check_identifier("dog", tokenizer)
    assert "'dog' is a frequent word" in warning and "sks" in warning
    (warning,) = check_identifier("zxqvbnmtoken", tokenizer)
    assert "splits into" in warning and "CLIP tokens" in warning
    with pytest.raises(ValueError):
        check_identifier("  ", tokenizer)


def test_datamodule_from_config(tmp_path):
    subj = make_folder(tmp_path / "subj", [RED, GREEN, BLUE])
    reg = make_folder(tmp_path / "reg", [BLUE, GREEN])
    config = OmegaConf.create({"target": "ldm.data.dreambooth.DreamBoothDataModule", "params": {
        "data_root": str(subj), "reg_data_root": str(reg), "token": "sks", "class_word": "dog",
        "batch_size": 2, "size": 32, "repeats": 2}})
    dm = instantiate_from_config(config)
    assert dm.batch_size == 2
    dm.setup("fit")
    dataset = dm.train_dataset
    dm.setup("validate")
    assert dm.train_dataset is dataset  # built once
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == batch["reg_image"].shape == (2, 3, 32, 32)
    assert batch["caption"] == ["photo of a sks dog"] * 2 and batch["reg_caption"] == ["photo of a dog"] * 2
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


@pytest.mark.parametrize("size, target", [((47, 32), (96, 64)), ((47, 35), (96, 64)), ((333, 250), (64, 64))])
def test_fit_box_never_leaves_the_image(size, target):
    # 47x32 -> 96x64 once made a crop box starting at -3.6e-15 and Pillow refused it ("box offset can't be
    # negative"), stopping a training run on an ordinary photo.
    from ldm.data.image_loading import fit
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    out = fit(img, *target)
    assert out.size == target
    # a uniform image stays uniform: the box covers only real pixels, no border is pulled in
    flat = fit(Image.new("RGB", size, (200, 10, 90)), *target)
    assert np.abs(np.asarray(flat, dtype=int) - [200, 10, 90]).max() <= 1
