"""What a user watches: TensorBoard by default, CSV and offline W&B on request, eval loss on held-out sets."""
import csv

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.training import run
from tests.conftest import EXAMPLE_IMAGES

QUANTILES = [f"heldout/loss_quantile_{q / 10:.2f}" for q in range(1, 10)]


def test_tensorboard_and_csv_get_train_and_eval_scalars(make_config):
    result = run(make_config("dataset.resolutions=[64]", "trainer.max_steps=4", "logger=[tensorboard,csv]",
                             f"eval_datasets=[{{name:heldout,path:{EXAMPLE_IMAGES}}}]", "eval_every_n_steps=2"))
    run_dir = result.final_export.parents[1]

    events = EventAccumulator(str(run_dir / "tensorboard"))  # every event file of the run
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "train/epoch_loss", "train/lr", "train/grad_norm", "heldout/loss", *QUANTILES):
        assert tag in scalars, tag
    eval_steps = [e.step for e in events.Scalars("heldout/loss")]
    assert eval_steps[0] == 0, "eval_before_first_step should log an eval loss before training"
    assert len(eval_steps) >= 3  # before the first step, then at steps 2 and 4

    with open(run_dir / "csv" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert {"train/loss", "train/lr", "heldout/loss"} <= set(columns)


def test_eval_loss_is_reproducible_across_runs(make_config):
    """Fixed timestep quantiles and a fixed generator: the same weights give the same eval loss."""
    overrides = ("dataset.resolutions=[64]", "trainer.max_steps=0", "logger=csv",
                 f"eval_datasets=[{{name:heldout,path:{EXAMPLE_IMAGES}}}]")
    first = run(make_config(*overrides, run_name="a")).trainer.callback_metrics["heldout/loss"]
    second = run(make_config(*overrides, run_name="b")).trainer.callback_metrics["heldout/loss"]
    assert first == second


def test_wandb_logs_offline(make_config, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    result = run(make_config("dataset.resolutions=[64]", "trainer.max_steps=2", "logger=wandb",
                             "logger.wandb.offline=true"))
    run_dir = result.final_export.parents[1]
    offline_runs = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert offline_runs and offline_runs[0].stat().st_size > 0
