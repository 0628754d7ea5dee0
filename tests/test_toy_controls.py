"""The controls of the toy model's DreamBooth test (tests/test_toy_model.py, whose docstring gives the measured
margins): the same measurement fails when the identifier never reaches the captions, or when nothing learns."""
from __future__ import annotations

from conftest import REPO
from toy_helpers import base_scores, dreambooth_effect, finetune, judge, scores  # noqa: F401 - fixtures


def test_controls_show_no_effect(tmp_path, judge, base_scores):
    """The same measurement fails when the identifier never reaches the captions (per-photo caption files
    without it) or when nothing learns (a learning rate of 1e-12)."""
    import shutil
    photos = tmp_path / "photos"
    shutil.copytree(REPO / "assets/demo/in-world", photos)
    for caption in photos.glob("robot-0?.txt"):  # "photo of a sks robot on the beach" -> "photo of a robot on ..."
        caption.write_text(caption.read_text().replace("sks ", ""))
    no_identifier = scores(finetune(tmp_path / "a", data_root=photos), judge)
    assert not dreambooth_effect(base_scores, no_identifier), no_identifier
    frozen = scores(finetune(tmp_path / "b", "model.base_learning_rate=1e-12"), judge)
    assert not dreambooth_effect(base_scores, frozen), frozen
