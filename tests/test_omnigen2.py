"""OmniGen2: our transformer against the upstream implementation (tests/data/omnigen2/make_fixture.py ran it
once at a tiny config with seeded weights and saved its state dict, inputs and output)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from difftrain.models.omnigen2 import OmniGen2Transformer2DModel

UPSTREAM = Path(__file__).parent / "data" / "omnigen2" / "upstream_forward.safetensors"


@pytest.fixture(scope="module")
def upstream() -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(UPSTREAM), "pt") as file:
        return json.loads(file.metadata()["config"]), {key: file.get_tensor(key) for key in file.keys()}


def upstream_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix("weight."): t for key, t in tensors.items() if key.startswith("weight.")}


def test_state_dict_has_the_checkpoint_keys_and_shapes(upstream):
    config, tensors = upstream
    ours = {key: tuple(t.shape) for key, t in OmniGen2Transformer2DModel(**config).state_dict().items()}
    assert ours == {key: tuple(t.shape) for key, t in upstream_weights(tensors).items()}


def test_forward_matches_the_upstream_implementation(upstream):
    config, tensors = upstream
    model = OmniGen2Transformer2DModel(**config).eval()
    model.load_state_dict(upstream_weights(tensors), strict=True)
    with torch.no_grad():
        output = model(tensors["input.latents"], tensors["input.timestep"], tensors["input.text"],
                       tensors["input.text_mask"])
    torch.testing.assert_close(output, tensors["output"], rtol=1e-5, atol=1e-5)
