"""The Lightning strategies a run may use: the presets under conf/trainer/ that the tests cover, and what the
sharded ones (fsdp, deepspeed) cannot combine with. Importable without torch, like the rest of validation."""
import importlib.util

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

# preset name -> its trainer.strategy: a Lightning strategy name or a strategy class
PRESETS = {"auto": "auto", "ddp": "ddp", "fsdp": "difftrain.parallel.fsdp.FullyShardedStrategy",
           "deepspeed": "lightning.pytorch.strategies.DeepSpeedStrategy"}
SHARDED = ("fsdp", "deepspeed")


def check_strategy(cfg: DictConfig) -> None:
    preset = strategy_preset(cfg.trainer.strategy)
    if preset in SHARDED:
        _check_sharded(cfg, preset)
    if preset == "deepspeed":
        _check_deepspeed(cfg.trainer)


def strategy_preset(strategy) -> str:
    """The preset a trainer.strategy value comes from; any other value is a ConfigError."""
    target = strategy.get("_target_") if OmegaConf.is_dict(strategy) else strategy
    for preset, value in PRESETS.items():
        if target == value:
            return preset
    shown = OmegaConf.to_container(strategy) if OmegaConf.is_config(strategy) else strategy
    raise ConfigError(f"trainer.strategy={shown} is not supported. Choose a tested preset: "
                      f"{', '.join(f'trainer={name}' for name in PRESETS)}.")


def _check_sharded(cfg: DictConfig, preset: str) -> None:
    fix = "use trainer=ddp (or trainer=auto)"
    if cfg.model.get("blocks_to_swap"):
        raise ConfigError(f"model.blocks_to_swap={cfg.model.blocks_to_swap} keeps whole blocks in CPU memory, which "
                          f"trainer={preset} cannot shard: {fix}, or set model.blocks_to_swap=0.")
    if cfg.model.get("compile") == "whole":
        raise ConfigError(f"model.compile=whole puts trainer={preset}'s per-block hooks inside one graph: use "
                          f"model.compile=true (each block compiled, the hooks outside), or {fix}.")
    if cfg.optimizer.get("gradient_release"):
        raise ConfigError(f"optimizer.gradient_release=true steps each weight during backward, before trainer="
                          f"{preset} has reduced its gradient shards: {fix}, or turn it off.")
    if preset == "fsdp" and cfg.sample_prompts:
        raise ConfigError("sample_prompts: previews render on rank 0 alone, and under trainer=fsdp every rank holds "
                          "only a shard of each weight: unset sample_prompts, or use trainer=ddp.")


def _check_deepspeed(trainer: DictConfig) -> None:
    import torch  # only for this preset: validation otherwise runs without torch

    if trainer.accelerator not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        raise ConfigError(f"trainer=deepspeed runs on CUDA GPUs only (trainer.accelerator={trainer.accelerator}, "
                          f"CUDA available: {torch.cuda.is_available()}): use trainer=fsdp or trainer=ddp here.")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError('trainer=deepspeed needs DeepSpeed: pip install -e ".[deepspeed]".')
