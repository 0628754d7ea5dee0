"""The DreamBooth evaluation dataset: 30 subjects, their class nouns, and the 25 prompts each is tested on.

Ruiz et al., "DreamBooth" (CVPR 2023), Sec. 4.1: 30 subjects (21 objects, 9 live subjects: cats and dogs),
each rendered with 25 recontextualization / property-modification prompts; live subjects get a list with
accessories and outfits instead of some object-only prompts. The upstream file ``prompts_and_classes.txt``
(github.com/google/dreambooth) holds a ``subject_name,class`` table and both prompt lists written as Python
``'a {0} {1} in the jungle'.format(unique_token, class_token)`` lines; we turn those into this codebase's
template style, ``"a {token} {class_word} in the jungle"`` (the placeholders of ``ldm.data.dreambooth``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ldm.data.image_loading import find_images, load_image

PROMPTS_FILE = "prompts_and_classes.txt"
DATASET_HINT = "clone github.com/google/dreambooth and pass its folder (the one holding dataset/)"
# The paper's "live subjects" are the pets; the file does not mark them, the class noun does.
LIVE_CLASSES = frozenset({"cat", "dog"})
_PROMPT_LINE = re.compile(r"^'(?P<body>[^']*)'\.format\(unique_token, class_token\),?$")


class DatasetError(ValueError):
    """The evaluation dataset is missing or malformed; the message is one line naming the file."""


@dataclass(frozen=True)
class Subject:
    """One evaluation subject: its folder name, class noun, whether it is a live subject, and its photos.

    ``prompt_templates`` are the 25 prompts of the subject's list (object or live) with ``{token}`` and
    ``{class_word}`` placeholders; :func:`prompts_for` fills them.
    """

    name: str
    class_word: str
    live: bool
    images: list[Path]
    prompt_templates: tuple[str, ...]


@dataclass(frozen=True)
class PromptsAndClasses:
    """The parsed ``prompts_and_classes.txt``: subject -> class noun, and the two prompt template lists."""

    classes: dict[str, str]
    object_prompts: list[str]
    live_prompts: list[str]


def dataset_dir(root: str | Path) -> Path:
    """The folder holding ``prompts_and_classes.txt``: ``root/dataset`` (the repository) or ``root`` itself."""
    root = Path(root).expanduser()
    for candidate in (root / "dataset", root):
        if (candidate / PROMPTS_FILE).is_file():
            return candidate
    raise DatasetError(f"{root}: DreamBooth evaluation dataset not found (no {PROMPTS_FILE} in it or in "
                       f"dataset/); {DATASET_HINT}")


def _template(body: str, path: Path, lineno: int) -> str:
    # {0} is the identifier, {1} the class noun in the upstream file; each must appear exactly once.
    if body.count("{0}") != 1 or body.count("{1}") != 1:
        raise DatasetError(f"{path}:{lineno}: prompt {body!r} must hold {{0}} and {{1}} once each")
    return body.replace("{0}", "{token}").replace("{1}", "{class_word}")


def parse_prompts_and_classes(text: str, path: Path = Path(PROMPTS_FILE)) -> PromptsAndClasses:
    """Parse the upstream file's three sections: ``Classes`` (a CSV table), ``Object Prompts`` and
    ``Live Subject Prompts`` (Python list literals of ``.format`` lines). ``path`` only names the file in errors.
    """
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"Object Prompts": [], "Live Subject Prompts": []}
    section = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line in ("Prompts", "prompt_list = [", "]", "subject_name,class"):
            continue
        if line == "Classes" or line in lists:
            section = line
        elif section == "Classes":
            name, sep, class_word = line.partition(",")
            if not sep or not name or not class_word:
                raise DatasetError(f"{path}:{lineno}: expected 'subject_name,class', got {line!r}")
            classes[name.strip()] = class_word.strip()
        elif section in lists and (match := _PROMPT_LINE.match(line)):
            lists[section].append(_template(match["body"], path, lineno))
        else:
            raise DatasetError(f"{path}:{lineno}: unexpected line {line!r}")
    if not classes or not all(lists.values()):
        raise DatasetError(f"{path}: expected the sections Classes, Object Prompts and Live Subject Prompts")
    return PromptsAndClasses(classes, lists["Object Prompts"], lists["Live Subject Prompts"])


def read_prompts_and_classes(root: str | Path) -> PromptsAndClasses:
    """Read and parse ``prompts_and_classes.txt`` of the dataset at ``root`` (see :func:`dataset_dir`)."""
    path = dataset_dir(root) / PROMPTS_FILE
    return parse_prompts_and_classes(path.read_text(encoding="utf-8"), path)


def subjects(root: str | Path) -> list[Subject]:
    """All subjects of the dataset, in file order, each with its sorted image files and prompt list.

    A subject folder that is missing or holds no images raises :class:`ldm.data.image_loading.ImageError`
    naming it: a partial download would otherwise shrink the benchmark silently.
    """
    folder = dataset_dir(root)
    spec = read_prompts_and_classes(folder)
    out = []
    for name, class_word in spec.classes.items():
        live = class_word in LIVE_CLASSES
        templates = tuple(spec.live_prompts if live else spec.object_prompts)
        images = find_images(folder / name, role="DreamBooth subject folder")
        out.append(Subject(name, class_word, live, images, templates))
    return out


def prompts_for(subject: Subject, token: str) -> list[str]:
    """The subject's 25 evaluation prompts with the identifier ``token`` and its class noun filled in,
    e.g. ``"a sks dog in the jungle"``."""
    if not token.strip():
        raise ValueError("token is empty; pass the identifier the model was fine-tuned with, e.g. 'sks'")
    return [t.format(token=token, class_word=subject.class_word) for t in subject.prompt_templates]


def class_prompt(subject: Subject) -> str:
    """The prior prompt "a [class noun]" (no identifier), used to generate the class images that PRES compares
    with the subject's real photos."""
    return f"a {subject.class_word}"


def real_images(subject: Subject, size: int) -> list[Image.Image]:
    """The subject's photos as RGB ``size x size`` centre crops, decoded by the training loader (EXIF, MPO)."""
    return [load_image(path, size) for path in subject.images]
