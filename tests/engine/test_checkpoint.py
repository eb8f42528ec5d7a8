"""model.pt: atomic write, faithful round trip (step sizes and every Transitional BN entry), clear errors for
a missing file or another architecture; BN statistics under bf16 input; the per-bit table and progress line."""
import pytest
import torch

import bitmixer_core as core
from orchestrator.engine.checkpoint import (load_model, load_weights, save_model_pt, state_dict_digest)
from orchestrator.engine.config import ModelConfig, StageConfig
from orchestrator.engine.evaluation import per_bit_table
from orchestrator.engine.worker import progress_line

MODEL = ModelConfig(name="resnet_tiny", num_classes=10, stem="small")


def trained_like_net():
    """A net whose state differs from a fresh build everywhere that matters (weights, step sizes, BN stats)."""
    torch.manual_seed(1)
    net = MODEL.build()
    core.calibrate_activation_step_sizes(net, torch.randn(8, 3, 32, 32))
    with torch.no_grad():
        for tensor in list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]:
            tensor.add_(torch.rand_like(tensor))
    return net


def test_model_pt_round_trip_keeps_everything(tmp_path):
    """Saving then load_model rebuilds the same architecture with an identical state dict."""
    net = trained_like_net()
    path = save_model_pt(tmp_path / "model.pt", net=net, model_name=MODEL.name, build_kwargs=MODEL.build_kwargs(),
                         stage="two", epoch=3, metrics={"val/top1_4bit": 50.0})
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind
    payload = torch.load(path, weights_only=True)  # what the engine writes is data only
    assert set(payload) == {"model_name", "build_kwargs", "state_dict", "stage", "epoch", "metrics"}
    again = load_model(str(tmp_path))  # a folder holding model.pt is accepted too
    assert state_dict_digest(again.state_dict()) == state_dict_digest(net.state_dict())
    assert payload["state_dict"]["layer1.0.bn1.weight"].shape[0] == 9  # every Transitional BN entry is saved


def test_model_pt_is_fp32_on_disk_whatever_the_engine_used(tmp_path):
    """A bf16 engine's weights are written as fp32 so any later stage (fp32 on CPU) loads them."""
    net = trained_like_net().bfloat16()
    save_model_pt(tmp_path / "model.pt", net=net, model_name=MODEL.name, build_kwargs=MODEL.build_kwargs(),
                  stage="three", epoch=0, metrics={})
    state = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


def test_missing_or_foreign_checkpoint_is_named(tmp_path):
    """init_from pointing nowhere, or at another architecture, fails with a sentence naming it."""
    with pytest.raises(FileNotFoundError, match="does not exist; give the model.pt"):
        load_weights(MODEL.build(), str(tmp_path / "nope.pt"), expect_model=MODEL.name)
    save_model_pt(tmp_path / "model.pt", net=MODEL.build(), model_name="resnet18", build_kwargs={},
                  stage="one", epoch=0, metrics={})
    with pytest.raises(ValueError, match="holds a 'resnet18', not a 'resnet_tiny'"):
        load_weights(MODEL.build(), str(tmp_path / "model.pt"), expect_model=MODEL.name)


def test_bn_fed_bf16_keeps_float32_statistics_that_still_move():
    """Under bf16 autocast a BN's input is a bf16 convolution output; its running statistics stay float32.
    A running variance of 1 fed batches of variance ~1.002 moves by ~2e-4 a step: float32 keeps that, bf16
    (resolution 2**-7 near 1) would not."""
    net = MODEL.build()
    net.train()
    bn = net.layer1[0].bn2
    bn.reset_running_stats()
    torch.manual_seed(0)
    x = torch.randn(4096, bn.num_features, 1, 1)
    x = (x - x.mean(0)) / x.std(0) * 1.001  # batch variance exactly 1.002001 per channel
    for _ in range(10):
        assert bn(x.bfloat16()).dtype == torch.bfloat16
    moved = bn.active_entry.running_var - 1.0
    assert bn.running_var.dtype == torch.float32
    assert torch.all(moved > 5e-4) and torch.all(moved < 3e-3), moved  # 1 - 0.9**10 of ~0.002 (+ bf16 input)


def test_per_bit_table_and_progress_line():
    """One row per fixed bit-width (weights/activations named) plus Rand. with its std; the progress line
    shows loss, lr, top-1 at each bit-width and Rand."""
    metrics = {"epoch": 1, "train_loss": 1.5, "lr": 1e-3, "epoch_time_s": 2.0, "val/rand_top1_mean": 40.0,
               "val/rand_top1_std": 1.5, "val/rand_top5_mean": 80.0}
    for b in (2, 3, 4):
        metrics[f"val/top1_{b}bit"], metrics[f"val/top5_{b}bit"] = 10.0 * b, 20.0 * b
    table = per_bit_table(metrics, bits=[2, 3, 4], stage="three", first_last="fp32", bits_weights=[1, 3, 4])
    assert table["bits"] == ["A2/W1", "A3/W3", "A4/W4", "Rand."]
    assert table["top1"] == [20.0, 30.0, 40.0, 40.0] and table["top1_std"][-1] == 1.5
    cfg = StageConfig.model_validate(dict(name="s", model=MODEL.model_dump(), data=dict(path="x", batch_size=8),
                                          optim=dict(epochs=3, warmup_epochs=0), policy=dict(stage="three"),
                                          tracking=dict(tracking_uri="sqlite:////tmp/x.db")))
    assert progress_line(cfg, metrics) == ("[s] epoch 2/3 loss 1.5000 lr 1.00e-03 top1 2b 20.0/3b 30.0/4b 40.0 "
                                           "rand 40.0% time 2.0s")


def test_stage_two_model_loads_into_a_per_bit_bn_stage(tmp_path):
    """Table 1's Stage III (bn per_bit) starts from the main chain's Stage II model.pt (Transitional BN):
    load_weights rebuilds the saved model and converts it, so at any uniform bit-width both compute alike."""
    net = trained_like_net()
    save_model_pt(tmp_path / "model.pt", net=net, model_name=MODEL.name, build_kwargs=MODEL.build_kwargs(),
                  stage="two", epoch=0, metrics={})
    per_bit = MODEL.model_copy(update={"bn": "per_bit"}).build()
    payload = load_weights(per_bit, str(tmp_path / "model.pt"), expect_model=MODEL.name, bn="per_bit")
    assert payload["stage"] == "two"
    net.eval(), per_bit.eval()
    x = torch.randn(2, 3, 32, 32)
    for bits in (2, 3, 4):
        core.set_bits(net, bits), core.set_bits(per_bit, bits)
        torch.testing.assert_close(per_bit(x), net(x))
    with pytest.raises(RuntimeError):  # without saying which BN mode it wants, the mismatch is an error
        load_weights(MODEL.model_copy(update={"bn": "per_bit"}).build(), str(tmp_path / "model.pt"),
                     expect_model=MODEL.name)
