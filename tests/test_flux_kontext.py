"""What is special to Flux Kontext (the conformance suite checks its LoRA in FluxKontextPipeline with a control
image, full fine-tune, fp8, resume, previews): the control image reaches the transformer exactly as diffusers'
FluxKontextPipeline feeds it, and the loss covers the target's tokens only."""
import torch
from PIL import Image

from difftrain.datamodules.media import load_image
from difftrain.modules.flux import pack_with_ids
from difftrain.training import build_module
from tests.conftest import ROOT, compose_config

KONTEXT = ("model=flux_kontext", "model.tiny=true", "model.dtype=float32", "model.max_sequence_length=64",
           "dataset=edit_example", "adapter=none")
CONTROL = ROOT / "data" / "examples" / "edit" / "control"


def kontext_module(tmp_path):
    module = build_module(compose_config(tmp_path / "run", *KONTEXT))
    module.configure_model()
    return module.eval()


def transformer_inputs_of_a_pipeline_call(module, image: torch.Tensor) -> dict:
    """The keyword arguments FluxKontextPipeline passes to the transformer on its first step."""
    pipe = module.inference_pipeline()
    seen = {}

    def record(_, args, kwargs) -> None:
        seen.setdefault("inputs", kwargs)

    pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    pipe(prompt="make it red", image=image, width=64, height=64, num_inference_steps=1, _auto_resize=False,
         max_area=64 * 64, output_type="latent")
    return seen["inputs"]


@torch.no_grad()
def test_control_tokens_and_position_ids_equal_the_pipelines(tmp_path):
    control_file = tmp_path / "control.png"
    Image.open(next(CONTROL.iterdir())).convert("RGB").resize((48, 80)).save(control_file)
    controls = load_image(control_file, (64, 64))[None, None]  # as the datamodule crops it to the target's bucket
    module = kontext_module(tmp_path)
    fed = transformer_inputs_of_a_pipeline_call(module, controls[0])

    target = torch.zeros(1, 3, 64, 64)
    encoded = module.load_cache_encoders().encode_images(target, controls=controls)
    assert encoded["control_latents"].shape == (1, 1, 16, 8, 8)
    image_tokens, image_ids = pack_with_ids(encoded["latents"])
    context, context_ids = module.context_tokens({"control_latents": encoded["control_latents"]}, image_tokens)

    count = image_tokens.shape[1]
    torch.testing.assert_close(context, fed["hidden_states"][:, count:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([image_ids, context_ids]), fed["img_ids"])
    assert (context_ids[:, 0] == 1).all() and (image_ids[:, 0] == 0).all()


@torch.no_grad()
def test_prediction_covers_the_target_tokens_and_depends_on_the_control(tmp_path):
    module = kontext_module(tmp_path)
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, 8, 8, generator=generator)
    text = {"prompt_embeds": torch.randn(1, 4, 32, generator=generator),
            "pooled_prompt_embeds": torch.randn(1, 32, generator=generator)}
    t = torch.tensor([0.5])
    one, other = (torch.randn(1, 1, 16, 8, 8, generator=generator) for _ in range(2))
    with_one = module.predict(noisy, t, text, cond={"control_latents": one})
    assert with_one.shape == noisy.shape
    assert not torch.allclose(with_one, module.predict(noisy, t, text, cond={"control_latents": other}))
    assert not torch.allclose(with_one, module.predict(noisy, t, text))  # text-to-image: no context tokens
