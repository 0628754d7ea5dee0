"""The whole v1 model, built on the meta device, has the state-dict layout of the original checkpoints."""
import pytest
import torch

from conftest import V1_CONFIG, load_config, reference_layout
from ldm.util import instantiate_from_config

DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}


@pytest.mark.parametrize("use_ema,layout", [(False, "sd-v1-state-dict.tsv"), (True, "sd-v1-state-dict-ema.tsv")])
def test_v1_state_dict_matches_reference_layout(use_ema, layout):
    config = load_config(V1_CONFIG)
    config.model.params.use_ema = use_ema
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    ours = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    ref = {k: (shape, DTYPES[dtype]) for k, (shape, dtype) in reference_layout(layout).items()}
    assert sorted(set(ref) - set(ours)) == []
    assert sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 859_520_964 + 83_653_863 + 123_060_480
