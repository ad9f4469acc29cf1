"""Makes upstream_forward.safetensors: OmniGen2's own transformer (VectorSpaceLab/OmniGen2 at commit
0f72fa92564d9f8ba76f53fcc3c05aca2372458f) built at a tiny config with seeded weights, run once on seeded inputs.
The file holds its state dict (`weight.<checkpoint key>`), the inputs (`input.*`) and the output; the config and the
commit are in its metadata. tests/test_omnigen2.py checks that our transformer has the same keys and output.

Run once, outside the project's environment needs: the upstream tree extracted from the fetched repository and
einops (which the project does not use) on PYTHONPATH, e.g.

    PYTHONPATH=/work/wt/omnigen2-upstream:/work/wt/omnigen2-upstream/deps python tests/data/omnigen2/make_fixture.py

Upstream picks triton's fused RMSNorm (GPU only) when triton is installed: the script turns that off, so its
torch.nn.RMSNorm path runs, as its non-flash attention path (OmniGen2AttnProcessor) does without flash-attn."""
import json
from pathlib import Path

import omnigen2.utils.import_utils as upstream_imports
import torch
from safetensors.torch import save_file

upstream_imports.is_triton_available = lambda: False  # its fused RMSNorm needs a GPU; torch.nn.RMSNorm instead

from omnigen2.models.transformers.repo import OmniGen2RotaryPosEmbed  # noqa: E402
from omnigen2.models.transformers.transformer_omnigen2 import OmniGen2Transformer2DModel  # noqa: E402

COMMIT = "0f72fa92564d9f8ba76f53fcc3c05aca2372458f"
CONFIG = dict(patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1, num_attention_heads=2,
              num_kv_heads=1, multiple_of=16, norm_eps=1e-5, axes_dim_rope=[4, 2, 2], axes_lens=[64, 32, 32],
              text_feat_dim=12, timestep_scale=1000.0)
OUT = Path(__file__).with_name("upstream_forward.safetensors")


def main() -> None:
    torch.manual_seed(0)
    model = OmniGen2Transformer2DModel(**CONFIG).eval()
    with torch.no_grad():  # the zero-initialised output and modulation layers would hide most of the model
        for param in model.parameters():
            param.normal_(0, 0.3)
    latents = torch.randn(2, CONFIG["in_channels"], 8, 6)
    text = torch.randn(2, 5, CONFIG["text_feat_dim"])
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    timestep = torch.tensor([0.3, 0.8])
    freqs_cis = OmniGen2RotaryPosEmbed.get_freqs_cis(CONFIG["axes_dim_rope"], CONFIG["axes_lens"], theta=10000)
    with torch.no_grad():
        output = model(latents, timestep, text, freqs_cis, text_mask)
    tensors = {f"weight.{key}": value.contiguous() for key, value in model.state_dict().items()}
    tensors.update({"input.latents": latents, "input.timestep": timestep, "input.text": text,
                    "input.text_mask": text_mask, "output": output.contiguous()})
    save_file(tensors, OUT, metadata={"config": json.dumps(CONFIG), "upstream_commit": COMMIT})


if __name__ == "__main__":
    main()
