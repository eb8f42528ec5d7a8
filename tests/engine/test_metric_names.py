"""The names a stage's figures go by in MLflow: grouped so the UI charts them together, logged with
step = epoch, no counters, no duplicates; an Independent network only at its own bit-width."""
from __future__ import annotations

from pathlib import Path

from orchestrator.engine.config import ModelConfig, StageConfig
from orchestrator.engine.evaluation import own_bit_rows, per_bit_table, top1_key, tracked_metrics
from orchestrator.engine.worker import _record_epoch

MODEL = ModelConfig(name="resnet_tiny", num_classes=10, bits_weights=[2, 3, 4], bits_activations=[2, 3, 4],
                    stem="small", first_last="fp32")


def reported(epoch: int = 1) -> dict:
    """What a worker reports to Ray after an evaluated epoch (evaluate_stage's names plus the loop's own)."""
    metrics = {"epoch": epoch, "train_loss": 1.5, "lr": 1e-3, "epoch_time_s": 2.0, "global_step": 90,
               "resumed_at_epoch": -1, "subnet_draws": 90, "subnet_digests": ["a", "a"], "val/images": 359,
               "val/rand_top1_mean": 40.0, "val/rand_top1_std": 1.5, "val/rand_top5_mean": 80.0,
               "val/rand_top5_std": 0.5}
    for b in (2, 3, 4):
        metrics[top1_key(b)], metrics[f"val/top5_{b}bit"] = 10.0 * b, 20.0 * b
    return metrics


def test_metric_names_are_grouped_and_counters_stay_out():
    """MLflow gets train/loss, train/lr, sys/epoch_time_s and val/... only: no epoch, global_step,
    resumed_at_epoch, subnet_draws, image count or digest list, and no final_ copies."""
    names = set(tracked_metrics(reported()))
    assert names == {"train/loss", "train/lr", "sys/epoch_time_s", "val/top1_2bit", "val/top1_3bit",
                     "val/top1_4bit", "val/top5_2bit", "val/top5_3bit", "val/top5_4bit", "val/rand_top1_mean",
                     "val/rand_top1_std", "val/rand_top5_mean", "val/rand_top5_std"}
    assert top1_key(2) == "val/top1_2bit"


def test_independent_network_logs_only_its_own_bit_width():
    """A network trained at 4 bits must not chart a chance-level figure at 2 or 3 bits, nor Rand."""
    names = set(tracked_metrics(reported(), fixed_bits=4))
    assert names == {"train/loss", "train/lr", "sys/epoch_time_s", "val/top1_4bit", "val/top5_4bit"}
    table = per_bit_table(reported(), bits=[2, 3, 4], stage="independent", first_last="fp32", bits_weights=[2, 3, 4])
    assert own_bit_rows(table, 4)["bits"] == ["A4/W4"] and own_bit_rows(table, 4)["top1"] == [40.0]


class _Logger:
    def __init__(self):
        self.metric_calls, self.tables, self.artifacts = [], [], []

    def metrics(self, values, step):
        self.metric_calls.append((step, dict(values)))

    def table(self, columns, artifact_file):
        self.tables.append((artifact_file, columns))

    def artifact(self, local_path, artifact_path=None):
        self.artifacts.append(Path(local_path).name)


def _cfg(policy: dict) -> StageConfig:
    return StageConfig.model_validate(dict(name="s", model=MODEL.model_dump(), data=dict(path="x", batch_size=8),
                                           optim=dict(epochs=3, warmup_epochs=0), policy=policy,
                                           tracking=dict(tracking_uri="sqlite:////tmp/x.db")))


def test_epoch_is_recorded_with_step_equal_to_the_epoch(tmp_path):
    """Rank 0 logs one batch of grouped metrics per epoch at step = epoch, so the per-bit charts have one
    point per evaluated epoch; an Independent run's per-bit table holds only its own row."""
    net = MODEL.build()
    for policy, epoch in (({"stage": "three"}, 1), ({"stage": "independent", "fixed_bits": 2}, 2)):
        logger = _Logger()
        _record_epoch(_cfg(policy), logger, net, tmp_path, reported(epoch), table=per_bit_table(
            reported(epoch), bits=[2, 3, 4], stage=policy["stage"], first_last="fp32", bits_weights=[2, 3, 4]),
            last=epoch == 2)
        [(step, values)] = logger.metric_calls
        assert step == epoch and "val/top1_2bit" in values and "epoch" not in values
    assert set(values) == {"train/loss", "train/lr", "sys/epoch_time_s", "val/top1_2bit", "val/top5_2bit"}
    assert [rows["bits"] for _, rows in logger.tables] == [["A2/W2"], ["A2/W2"]]
    assert logger.artifacts == ["model.pt"]
