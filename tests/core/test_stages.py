"""One notion of stage (section 3.3): what each quantizes, how it draws, what it does when it starts."""

import pytest
import torch

from bitmixer_core import (STAGES, BitWidths, build_model, get_stage, quantized_layers, set_bits)


def test_each_stage_says_what_it_quantizes_and_how_it_draws():
    """FP32 quantizes nothing, Stage I activations only, II/III/Independent both; only I-III draw at random."""
    assert [(s.quantize_weights, s.quantize_activations) for s in STAGES.values()] == [
        (False, False), (False, True), (True, True), (True, True), (True, True)]
    bits = BitWidths()
    assert get_stage("fp32").policy(bits) is None and get_stage("independent").policy(bits) is None
    assert get_stage("three").policy(bits, k=0.5).k == 0.5 and get_stage("one").policy(bits).stage == 1
    assert get_stage("independent").title == "Independent"
    with pytest.raises(ValueError, match="unknown stage 'fixed'"):
        get_stage("fixed")


def test_stage_two_from_stage_one_refits_weight_step_sizes_only():
    """Stage I's weights are real-valued and moved: Stage II fits their step sizes again and leaves the BN
    entries alone; Stage III after II keeps the step sizes and seeds the mixed entries."""
    torch.manual_seed(0)
    model = build_model("resnet_tiny", num_classes=10, stem="small")
    layer = quantized_layers(model)[0][1]
    with torch.no_grad():
        layer.weight.mul_(5)
    before = layer.weight_step_size.detach().clone()
    done = get_stage("two").start_from(model, get_stage("one"))
    assert torch.all(layer.weight_step_size > 2 * before) and len(done) == 1
    tbn = model.layer1[0].bn2
    with torch.no_grad():
        tbn.entries[tbn.entry_keys.index((2, 2))].running_mean.fill_(7.0)
    steps = layer.weight_step_size.detach().clone()
    done = get_stage("three").start_from(model, get_stage("two"))
    assert torch.equal(layer.weight_step_size.detach(), steps) and "seeded" in done[0]
    assert torch.all(tbn.entries[tbn.entry_keys.index((2, 4))].running_mean == 7.0)
    assert get_stage("three").start_from(model, get_stage("three")) == []


def test_set_precision_switches_every_layer():
    model = build_model("resnet_tiny", num_classes=10, stem="small", first_last="int8")
    get_stage("one").set_precision(model)
    assert all(not m.quantize_weights and m.quantize_activations for _, m in quantized_layers(model))
    assert not model.fc.quantize_weights
    get_stage("fp32").set_precision(model)
    set_bits(model, 2)
    assert model.layer1[0].bn2.transition == (4, 4)  # FP32 uses the (max, max) entries


def test_only_a_stage_that_quantizes_activations_not_yet_fitted_needs_calibration():
    """The first quantized stage of a chain fits the activation step sizes to data; FP32 never does; a stage
    that starts from a calibrated model (II after I, III after II, Independent after I) keeps them."""
    from bitmixer_core import calibrate_activation_step_sizes
    torch.manual_seed(0)
    model = build_model("resnet_tiny", num_classes=10, stem="small")
    assert not get_stage("fp32").needs_calibration(model)
    assert get_stage("one").needs_calibration(model) and get_stage("three").needs_calibration(model)
    calibrate_activation_step_sizes(model, torch.randn(4, 3, 16, 16))
    assert not any(stage.needs_calibration(model) for stage in STAGES.values())
    with torch.no_grad():
        quantized_layers(model)[-1][1].activation_step_initialized[0] = False  # one step size never fitted
    assert get_stage("two").needs_calibration(model)
