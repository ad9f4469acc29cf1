"""Render with a base model and an exported LoRA file, loaded the way the file's consumer loads it:
`python scripts/sample.py model=flux model.diffusers_path=/models/FLUX.1-dev lora=<exported file> prompt="a cat"
seed=0 steps=20 out=cat.png` -> a PNG (an MP4 for a video family). Keys: conf/sample.yaml."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import difftrain.config  # noqa: E402, F401  (registers the ${project_root:} resolver)
from difftrain.config.samples import SampleRequest, make_request, read_prompts  # noqa: E402
from difftrain.config.validate import ConfigError, validate_model  # noqa: E402


def sample(cfg: DictConfig) -> list[Path]:
    """Render every prompt of the config; returns the files written."""
    requests = sample_requests(cfg)
    validate_model(cfg.model, "lora" if cfg.lora else "none")
    if cfg.lora and not Path(cfg.lora).is_file():
        raise ConfigError(f"lora={cfg.lora} does not exist. It should be a LoRA file train.py exported "
                          f"(<run_dir>/exports/<step|epoch|final>/...).")
    import torch  # heavy imports only once the config is known to be good

    from difftrain.callbacks.previews import is_video, render_requests, save_media
    from difftrain.training import build_module

    module = build_module(OmegaConf.create({"model": cfg.model, "seed": cfg.seed, "adapter": None,
                                            "optimizer": None, "scheduler": None}))
    module.configure_model()
    module.to(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    if cfg.lora:
        module.load_exported_lora(Path(cfg.lora))
    with torch.no_grad():
        media = render_requests(module, requests, cfg.steps, cfg.guidance)
    files = output_files(Path(cfg.out), [is_video(m) for m in media])
    for item, file in zip(media, files):
        file.parent.mkdir(parents=True, exist_ok=True)
        save_media(item, file, module.framerate or 1)
    return files


def sample_requests(cfg: DictConfig) -> list[SampleRequest]:
    entries = [cfg.prompt] if isinstance(cfg.prompt, str) else read_prompts(cfg.prompt, "prompt")
    entries += read_prompts(cfg.prompt_file, "prompt_file")
    if not entries:
        raise ConfigError("Nothing to render: give a prompt (prompt=\"a cat\"), a list of them, or a text file with one "
                          "prompt per line (prompt_file=prompts.txt).")
    defaults = dict(seed=cfg.seed, width=cfg.width, height=cfg.height, frames=cfg.frames, image=cfg.image)
    return [make_request(entry, defaults, f"prompt[{i}]" if len(entries) > 1 else "prompt")
            for i, entry in enumerate(entries)]


def output_files(out: Path, videos: list[bool]) -> list[Path]:
    """`out` (one sample) or out_<index> (several), with the suffix .mp4 for videos."""
    stems = [out.stem] if len(videos) == 1 else [f"{out.stem}_{i}" for i in range(len(videos))]
    return [out.with_name(stem + (".mp4" if video else out.suffix or ".png")) for stem, video in zip(stems, videos)]


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        for file in sample(cfg):
            print(file)
    except ConfigError as error:  # the user's to fix: the message alone, no traceback
        raise SystemExit(f"Error: {error}") from None


if __name__ == "__main__":
    main()
