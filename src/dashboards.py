"""The resolved config of a run on its dashboards: TensorBoard hparams (hparams.yaml and the HPARAMS tab) and the
W&B run config, so runs (and sweep jobs) can be compared by what they trained with. Values the config reads from the
environment (`${oc.env:...}`) and keys that look like credentials are replaced by a placeholder: dashboards are
shared, environments hold secrets."""
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

HIDDEN = "<hidden>"
CREDENTIAL_KEY = re.compile(r"secret|token|password|passwd|api_?key|credential", re.IGNORECASE)


def dashboard_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers, with environment values and credential-like keys hidden."""
    return _hide(OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg, resolve=False))


def _hide(resolved: Any, raw: Any) -> Any:
    if isinstance(resolved, dict):
        raw = raw if isinstance(raw, dict) else {}
        return {key: HIDDEN if CREDENTIAL_KEY.search(str(key)) else _hide(value, raw.get(key))
                for key, value in resolved.items()}
    if isinstance(resolved, list):
        raw = raw if isinstance(raw, list) else [None] * len(resolved)
        return [_hide(value, raw_value) for value, raw_value in zip(resolved, raw)]
    return HIDDEN if isinstance(raw, str) and "oc.env" in raw else resolved


def log_config(loggers: list, cfg: DictConfig) -> None:
    config = dashboard_config(cfg)
    for logger in loggers:
        logger.log_hyperparams(config)


def finish_loggers(loggers: list) -> None:
    """Ends the W&B run of a finished (or failed) training run, so that its files are complete and the next run in
    the same process gets a W&B run of its own (Lightning leaves it open)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
