"""Lightning's log lines, printed once."""
import logging


def lightning_logs_to_root_handlers() -> None:
    """`import lightning` gives the "lightning" logger a console handler of its own, and its records still propagate
    to the root logger: where the root has handlers (Hydra's console and <run_dir>/train.log, pytest's capture),
    every line came out twice. Leave them to the root's handlers, as lightning.pytorch and lightning.fabric
    themselves do when the root has handlers; without any, Lightning's own handler stays the one that prints."""
    import lightning  # noqa: F401  (the handler is added at its first import)

    if logging.getLogger().hasHandlers():
        logging.getLogger("lightning").handlers.clear()
