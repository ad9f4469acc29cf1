"""HunyuanVideo beyond the conformance suite: the official and ComfyUI layouts, our key maps against diffusers'
converters (which hard-code the 13B sizes, so checked at real size on meta tensors), the prompt template crop, images
and videos in one run, and the LoRA read by diffusers' own HunyuanVideo loader."""
import pickle
import shutil

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from PIL import Image
from safetensors.torch import load_file, save_file

from difftrain.config.validate import ConfigError
from difftrain.datamodules.cache import EmbeddingCache
from difftrain.formats import hunyuan_video as formats
from difftrain.modules.hunyuan_video import LORA_FILE, HunyuanVideoModule
from difftrain.tiny import hunyuan_video as tiny
from difftrain.tiny import tiny_model
from difftrain.training import build_module, run
from tests.conftest import ROOT, compose_config
from tests.test_conformance import FAMILIES, prediction

OVERRIDES = FAMILIES["hunyuan_video"].overrides
CAPTIONS = ["a red circle", "the green square slides to the left"]


def fresh_module(tmp_path, *overrides: str) -> HunyuanVideoModule:
    module = build_module(compose_config(tmp_path / "fresh", *OVERRIDES, "adapter=none", *overrides))
    module.configure_model()
    return module.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step LoRA run on the example videos plus one image."""
    folder = tmp_path_factory.mktemp("media") / "videos"
    shutil.copytree(ROOT / "data" / "examples" / "videos", folder)
    Image.new("RGB", (40, 30), "red").save(folder / "still.png")
    (folder / "still.txt").write_text("a red picture")
    return run(compose_config(tmp_path_factory.mktemp("run") / "run", *OVERRIDES, f"dataset.path={folder}",
                              "adapter.rank=4", "optimizer.lr=1e-2", "trainer.max_steps=2",
                              "checkpoint_every_n_steps=null"))


def test_official_folder_and_comfyui_files_load_the_same_model(tmp_path):
    root = tiny_model("hunyuan_video")
    reference = tiny.transformer().state_dict()
    official = fresh_module(tmp_path)
    comfy = fresh_module(tmp_path, f"model.transformer_path={root / tiny.COMFY_TRANSFORMER}",
                         f"model.vae_path={root / tiny.COMFY_VAE}", f"model.llm_path={root / formats.LLM_DIR}",
                         f"model.clip_path={root / formats.CLIP_DIR}")
    for module in (official, comfy):
        state = module.denoiser.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[key], value) for key, value in reference.items())
    assert official.vae_file.suffix == ".pt" and comfy.vae_file.suffix == ".safetensors"
    vaes = [formats.load_vae(module.vae_file, torch.float32).state_dict() for module in (official, comfy)]
    assert all(torch.equal(vaes[1][key], value) for key, value in vaes[0].items())

    fp8 = fresh_module(tmp_path, f"model.transformer_path={root / tiny.COMFY_TRANSFORMER_FP8}").denoiser.state_dict()
    stored = formats.HUNYUAN_VIDEO.to_diffusers(load_file(root / tiny.COMFY_TRANSFORMER_FP8), "fp8")
    assert any(tensor.dtype == torch.float8_e4m3fn for tensor in stored.values())
    assert all(torch.equal(fp8[key], tensor.float()) for key, tensor in stored.items())


class NotATensor:
    pass


def test_official_checkpoint_is_read_with_weights_only(tmp_path):
    """A pickle that would run code (any object beyond tensors) is refused, with the file named."""
    checkpoint = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "extra": NotATensor()}, checkpoint)
    with pytest.raises(ConfigError, match="mp_rank_00_model_states.pt") as error:
        fresh_module(tmp_path, f"model.transformer_path={checkpoint}")
    assert isinstance(error.value.__cause__, pickle.UnpicklingError)


def test_missing_files_are_one_error_naming_the_keys(make_config):
    with pytest.raises(ConfigError, match="model.vae_path, model.llm_path, model.clip_path not set"):
        build_module(make_config("model=hunyuan_video", "model.transformer_path=/tmp"))


def real_size_transformer_state() -> dict[str, torch.Tensor]:
    with init_empty_weights():
        return HunyuanVideoTransformer3DModel().state_dict()  # diffusers' defaults: the released 13B model


def test_key_map_equals_diffusers_single_file_converter():
    # Real size, on meta tensors: every key and shape.
    real = real_size_transformer_state()
    converted = convert_hunyuan_video_transformer_to_diffusers(formats.transformer_to_native(real))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in real.items()}
    # Tiny size, values: everything but the single blocks' linear1 (the converter splits it at 3072 rows).
    tiny_state = tiny.transformer().state_dict()
    native = formats.transformer_to_native(tiny_state)
    converted = convert_hunyuan_video_transformer_to_diffusers({k: v for k, v in native.items() if ".linear1." not in k})
    assert converted and all(torch.equal(tensor, tiny_state[key]) for key, tensor in converted.items())
    single_parts = {k for k in tiny_state.keys() - converted.keys()}
    assert single_parts and all(k.startswith("single_transformer_blocks.") for k in single_parts)


def test_lora_reader_equals_diffusers_lora_converter_at_real_size():
    """Every Linear the LoRA trains, at the real size on meta tensors: our inverse map resolves each key of our
    file to what diffusers' HunyuanVideo LoRA converter makes of it."""
    rank = 4
    weights = {key.removesuffix(".weight"): tensor for key, tensor in real_size_transformer_state().items()
               if tensor.ndim == 2 and key.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    lora = {}
    for module, weight in weights.items():
        lora[f"{module}.lora_A.weight"] = torch.empty(rank, weight.shape[1], device="meta")
        lora[f"{module}.lora_B.weight"] = torch.empty(weight.shape[0], rank, device="meta")
    exported = formats.lora_to_original(lora)
    assert "transformer.double_blocks.0.img_attn_qkv.lora_A.weight" in exported
    theirs = _convert_hunyuan_video_lora_to_diffusers(dict(exported))
    ours = formats.lora_from_original(exported)
    assert {k: v.shape for k, v in theirs.items()} == {f"transformer.{k}": v.shape for k, v in ours.items()}


def test_lora_loads_in_diffusers_pipeline_and_reproduces_our_output(trained, tmp_path):
    """diffusers' converter reads every key at the tiny size except the single blocks' linear1 (split at 3072
    rows): with that LoRA zeroed in our model (the shared run's module: later tests read only its data) and left
    out of the file, the pipeline's load reproduces us."""
    ours = trained.module.eval()
    for block in ours.denoiser.single_transformer_blocks:
        for layer in (block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp):
            layer.lora_B.default.weight.data.zero_()
    lora = {k: v for k, v in load_file(trained.final_export / LORA_FILE).items() if ".linear1." not in k}
    save_file(lora, tmp_path / LORA_FILE)
    batch = next(iter(trained.datamodule.train_dataloader()))
    expected = prediction(ours, batch)
    consumer = fresh_module(tmp_path)
    assert not torch.allclose(prediction(consumer, batch), expected, atol=1e-4), "the LoRA changes nothing"
    consumer.inference_pipeline().load_lora_weights(tmp_path / LORA_FILE)
    torch.testing.assert_close(prediction(consumer, batch), expected, rtol=1e-5, atol=1e-5)


def test_images_and_videos_train_in_one_run(trained):
    frames = {}
    for sample in trained.datamodule.train_set.samples:
        latents = EmbeddingCache.read(sample.latent_path)["latents"]
        frames[sample.item.path.suffix] = (sample.bucket[2], latents.shape[1])
    assert frames[".png"] == (1, 1)
    assert {frames[suffix] for suffix in (".mp4", ".webm", ".gif", ".mov")} == {(5, 2)}  # 4x temporal compression


def test_frame_buckets_must_be_encodable_by_the_vae(make_config):
    with pytest.raises(ConfigError, match=r"4k\+1"):
        run(make_config(*OVERRIDES, "dataset.frame_buckets=[1,6]"))


def test_prompt_embeddings_equal_the_pipelines_and_crop_the_template(tmp_path):
    module = fresh_module(tmp_path, "model.max_sequence_length=64")  # no caption truncated
    encoders = module.load_cache_encoders()
    cached = encoders.encode_captions(CAPTIONS)
    pipe, template = encoders.pipe, DEFAULT_PROMPT_TEMPLATE["template"]

    # Hand-computed positions: the caption's tokens start where the template's prefix ends.
    prefix = pipe.tokenizer(template.split("{}")[0]).input_ids
    crop = encoders.prompt_template["crop_start"]
    assert crop == len(prefix) > 2
    for caption, ours in zip(CAPTIONS, cached):
        ids = pipe.tokenizer(template.format(caption)).input_ids
        assert ids[:crop] == prefix
        assert pipe.tokenizer.decode(ids[crop:]) == caption + "<|eot_id|>"
        with torch.no_grad():
            hidden = pipe.text_encoder(torch.tensor([ids]), output_hidden_states=True).hidden_states[-3][0]
        torch.testing.assert_close(ours["prompt_embeds"], hidden[crop:])

    embeds, pooled, mask = pipe.encode_prompt(CAPTIONS, prompt_template={"template": template, "crop_start": crop},
                                              max_sequence_length=module.max_sequence_length)
    batch = module.collate_text(cached)
    length = batch["prompt_embeds"].shape[1]
    assert torch.equal(batch["prompt_embeds_mask"], mask[:, :length].bool()) and not mask[:, length:].any()
    torch.testing.assert_close(batch["prompt_embeds"][batch["prompt_embeds_mask"]], embeds[mask.bool()])
    torch.testing.assert_close(batch["pooled_prompt_embeds"], pooled)

