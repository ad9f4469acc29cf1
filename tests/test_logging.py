"""What a user watches: TensorBoard by default, CSV and offline W&B on request, eval loss on held-out sets."""
import csv

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from difftrain.training import run
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


def test_eval_loss_is_comparable_across_eval_points(make_config):
    """Fixed timestep quantiles and a fixed generator: unchanged weights (lr 0) give the same eval loss at
    every eval point, whatever training drew from the RNG in between."""
    result = run(make_config("dataset.resolutions=[64]", "trainer.max_steps=2", "logger=csv", "optimizer.lr=0",
                             f"eval_datasets=[{{name:heldout,path:{EXAMPLE_IMAGES}}}]", "eval_every_n_steps=1"))
    with open(result.final_export.parents[1] / "csv" / "metrics.csv") as f:
        losses = [float(row["heldout/loss"]) for row in csv.DictReader(f) if row.get("heldout/loss")]
    assert len(losses) == 3 and len(set(losses)) == 1, losses


def test_wandb_logs_offline(make_config, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    result = run(make_config("dataset.resolutions=[64]", "trainer.max_steps=2", "logger=wandb",
                             "logger.wandb.offline=true"))
    run_dir = result.final_export.parents[1]
    offline_runs = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert offline_runs and offline_runs[0].stat().st_size > 0
