"""The checkpoint loader: round trips, EMA selection, and a one-line error for each kind of wrong file."""
import zipfile

import pytest
import torch

from conftest import load_config
from ldm.util import instantiate_from_config
from ldm.weights.checkpoint import CheckpointError, ema_key, load_checkpoint, read_checkpoint, save_checkpoint
from ldm.weights.load import load_model_from_config


def fresh_tiny(use_ema=False):
    config = load_config()
    config.model.params.use_ema = use_ema
    return instantiate_from_config(config.model)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_round_trip_restores_every_tensor(tiny_model, tmp_path, suffix):
    path = save_checkpoint(tmp_path / f"m{suffix}", tiny_model.state_dict(), global_step=12)
    sd, meta = read_checkpoint(path)
    assert meta["global_step"] == 12
    model = fresh_tiny()
    load_checkpoint(model, path)
    assert_same_weights(model, tiny_model)


def test_meta_device_build_loads_the_file(tiny_model, tiny_ckpt):
    model = load_model_from_config(load_config(), tiny_ckpt)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert_same_weights(model, tiny_model)


def test_ckpt_is_a_plain_weights_only_pickle(tiny_ckpt):
    obj = torch.load(tiny_ckpt, weights_only=True)
    assert set(obj) == {"state_dict", "global_step"} and obj["global_step"] == 7


def test_bare_state_dict_without_position_ids_loads(tiny_model, tmp_path):
    sd = dict(tiny_model.state_dict())
    del sd["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    path = tmp_path / "bare.pt"
    torch.save(sd, path)  # no "state_dict" wrapper: some tools write this
    model = fresh_tiny()
    load_checkpoint(model, path)
    assert_same_weights(model, tiny_model)


def test_full_ema_file_samples_with_ema_weights(tiny_model, tmp_path):
    sd = dict(tiny_model.state_dict())
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    for k in unet_keys:
        sd[ema_key(k)] = sd[k] + 1.0  # EMA weights that differ from the live ones
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(5, dtype=torch.int32)
    path = save_checkpoint(tmp_path / "full-ema.ckpt", sd)

    plain = fresh_tiny(use_ema=False)
    meta = load_checkpoint(plain, path)
    assert meta["used_ema"]
    k = unet_keys[0]
    assert torch.equal(plain.state_dict()[k], sd[ema_key(k)])

    live = fresh_tiny(use_ema=False)
    load_checkpoint(live, path, prefer_ema=False)
    assert torch.equal(live.state_dict()[k], sd[k])

    with_ema = fresh_tiny(use_ema=True)
    load_checkpoint(with_ema, path)
    assert torch.equal(with_ema.state_dict()[k], sd[k])
    assert torch.equal(with_ema.state_dict()[ema_key(k)], sd[ema_key(k)])
    assert int(with_ema.state_dict()["model_ema.num_updates"]) == 5


def test_ema_config_from_ema_only_file_starts_ema_from_weights(tiny_ckpt, tiny_model):
    model = fresh_tiny(use_ema=True)
    load_checkpoint(model, tiny_ckpt)
    k = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.state_dict()[ema_key(k)], tiny_model.state_dict()[k])


def test_a_fresh_ema_keeps_the_configured_decay_when_built_on_the_meta_device(tiny_model, tmp_path):
    """A base file without EMA (pruned, or the toy model) loaded into a model that trains with EMA: the EMA starts
    at the weights with ``model.params.ema_decay`` as configured (it was 0.9999 whatever the config said, when the
    model was built on the meta device as load_model_from_config and main.py's --actual_resume build it)."""
    config = load_config()
    config.model.params.use_ema, config.model.params.ema_decay = True, 0.99
    plain = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("model_ema.")}
    model = load_model_from_config(config, save_checkpoint(tmp_path / "base.safetensors", plain), verbose=False)
    assert float(model.model_ema.decay) == pytest.approx(0.99) and int(model.model_ema.num_updates) == 0
    k = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.state_dict()[ema_key(k)], plain[k])


class PickledCallback:
    """An arbitrary class in the pickle, as old Lightning checkpoints carry; running it must never happen."""

    def __setstate__(self, state):
        raise AssertionError("unpickling ran code")


def test_pickled_callback_object_is_not_executed(tiny_model, tmp_path):
    cb = PickledCallback.__new__(PickledCallback)
    cb.__dict__["x"] = 1
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": tiny_model.state_dict(), "callbacks": {"cb": cb}, "global_step": 3}, path)
    model = fresh_tiny()
    assert load_checkpoint(model, path)["global_step"] == 3


# ---- bad input: one line naming the file and what is wrong ------------------------------------------------

def error_for(path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(fresh_tiny(), path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path):
    assert "not found" in error_for(tmp_path / "nope.ckpt")


def test_text_file(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_text("<html>404 Not Found</html>")
    assert "not a readable" in error_for(path)


def test_truncated_download(tiny_ckpt, tmp_path):
    data = tiny_ckpt.read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in error_for(path)


def test_truncated_safetensors(tiny_model, tmp_path):
    good = save_checkpoint(tmp_path / "good.safetensors", tiny_model.state_dict())
    path = tmp_path / "bad.safetensors"
    path.write_bytes(good.read_bytes()[:1000])
    assert "safetensors" in error_for(path)


def test_sd2_checkpoint_is_named(tiny_model, tmp_path):
    sd = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("cond_stage_model.")}
    sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3 * 32, 32)
    k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    sd[k] = torch.zeros(sd[k].shape[0], 1024)
    message = error_for(save_checkpoint(tmp_path / "sd2.ckpt", sd))
    assert "Stable Diffusion 2" in message and "text encoder" in message and "another shape" in message


def test_lora_file_is_named(tmp_path):
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    message = error_for(save_checkpoint(tmp_path / "adapter.safetensors", sd))
    assert "LoRA" in message and "UNet" in message and "missing" in message


def test_folder_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    assert "diffusers" in error_for(tmp_path)


def test_atomic_save_keeps_old_file_when_writing_fails(tiny_model, tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.ckpt", tiny_model.state_dict(), global_step=1)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, tiny_model.state_dict(), global_step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert zipfile.is_zipfile(path)


def test_legacy_non_zip_pickle_loads(tiny_model, tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": tiny_model.state_dict()}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    model = fresh_tiny()
    load_checkpoint(model, path)
    assert_same_weights(model, tiny_model)
