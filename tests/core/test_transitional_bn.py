"""Transitional BN (section 3.2): one entry per (previous bits, next bits) pair, chosen from the assignment."""

import pytest
import torch

from bitmixer_core import (TransitionalBatchNorm2d, build_model, calibrate_activation_step_sizes, set_bits,
                           set_quantization)


def randomise_entries(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TransitionalBatchNorm2d):
                for bn in m.entries:
                    bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
                    bn.bias.copy_(torch.randn(bn.bias.shape, generator=g))
                    bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
                    bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)


def test_every_pair_has_its_own_entry_and_modes_shrink_it():
    """transitional: |prev| x |next| entries; per_bit: one per bit-width; shared: one."""
    assert len(TransitionalBatchNorm2d(4, (2, 3, 4)).entries) == 9
    assert len(TransitionalBatchNorm2d(4, (2, 3, 4), previous_bits=(32,)).entries) == 3
    assert len(TransitionalBatchNorm2d(4, (2, 3, 4), "per_bit").entries) == 3
    assert len(TransitionalBatchNorm2d(4, (2, 3, 4), "shared").entries) == 1
    with pytest.raises(ValueError, match="bn mode"):
        TransitionalBatchNorm2d(4, (2, 3, 4), "adabits")


def test_previous_layer_bits_alone_change_the_entry_and_the_output():
    """The BN before layer2.0.conv1 sits between layer1.0.conv2 (previous) and layer2.0.conv1 (next):
    changing only the previous layer's bits selects another (i, j) entry, and the BN output changes."""
    model = build_model("resnet_tiny", num_classes=10, stem="small", block_order="bn_quantize_conv")
    randomise_entries(model)
    model.eval()
    bn = model.layer2[0].bn1
    set_bits(model, 4)
    x = torch.randn(2, bn.num_features, 5, 5)
    assert bn.transition == (4, 4)
    out_44 = bn(x)
    set_bits(model, {"layer1.0.conv2": 2})
    assert bn.transition == (2, 4)
    assert not torch.allclose(bn(x), out_44)
    set_bits(model, {"layer2.0.conv1": 3})
    assert bn.transition == (2, 3)


def test_shortcut_conv_has_its_own_bn_keyed_by_its_own_bits():
    """The block input feeds two quantized convs in a downsampling block: each has its own BN, keyed by
    (bits of the layer that made the input, bits of that conv)."""
    model = build_model("resnet_tiny", num_classes=10, stem="small", block_order="bn_quantize_conv")
    set_bits(model, {"layer1.0.conv2": 3, "layer2.0.conv1": 2, "layer2.0.downsample.1": 4})
    assert model.layer2[0].bn1.transition == (3, 2)
    assert model.layer2[0].downsample[0].transition == (3, 4)


# The BN between layer1.0.conv1 (layer l-1) and layer1.0.conv2 (layer l) in each block order.
BETWEEN_CONV1_AND_CONV2 = {"bn_quantize_conv": "bn2", "conv_bn_relu": "bn1"}


@pytest.mark.parametrize("block_order", ["conv_bn_relu", "bn_quantize_conv"])
def test_transitional_statistics_depend_on_the_previous_layers_bits(block_order):
    """Training-mode passes with layer1.0.conv1 at 2 bits and at 4 bits (conv2 fixed) leave different
    running statistics in the (2, j) and (4, j) entries of the BN between them: the entries track what
    the previous layer's precision does to the features (the default order and BN first)."""
    torch.manual_seed(0)
    model = build_model("resnet_tiny", num_classes=10, stem="small", block_order=block_order)
    images = torch.randn(16, 3, 32, 32)
    calibrate_activation_step_sizes(model, images)
    model.train()
    bn = getattr(model.layer1[0], BETWEEN_CONV1_AND_CONV2[block_order])
    set_bits(model, {"layer1.0.conv1": 2, "layer1.0.conv2": 4})
    assert bn.transition == (2, 4)
    for bits in (2, 4):
        set_bits(model, 4)
        set_bits(model, {"layer1.0.conv1": bits})
        for _ in range(20):
            model(images)
    low, high = bn.entries[bn.entry_keys.index((2, 4))], bn.entries[bn.entry_keys.index((4, 4))]
    assert low.num_batches_tracked == high.num_batches_tracked == 20
    gap = (low.running_var - high.running_var).abs() / high.running_var
    assert gap.max() > 0.05, gap


def test_fixed_sides_and_fp32_mode():
    """The first block's input BNs follow the fixed first conv (32 bits when FP32, 8 when int8); the final
    BN feeds the fixed FC; with activations not quantized every BN uses its (max, max) entry."""
    model = build_model("resnet_tiny", num_classes=10, stem="small", first_last="int8", block_order="bn_quantize_conv")
    set_bits(model, 2)
    assert model.layer1[0].bn1.transition == (8, 2)
    assert model.bn_out.transition == (2, 8)
    assert model.layer2[0].downsample[0].transition == (2, 2)
    set_quantization(model, weights=False, activations=False)
    assert model.layer1[0].bn2.transition == (4, 4) and model.layer1[0].bn1.transition == (8, 4)
    fp = build_model("resnet_tiny", num_classes=10, stem="small", block_order="bn_quantize_conv")
    assert fp.layer1[0].bn1.previous_bits == (32,) and fp.bn_out.next_bits == (32,)
    assert isinstance(fp.bn1, torch.nn.BatchNorm2d)  # the stem BN sees only the fixed first conv


def test_classic_block_order_keys_bns_by_the_conv_before_and_the_next_block():
    """block_order="conv_bn_relu": bn_k sits between conv_k and conv_k+1, a block's output BNs (main path
    and downsample) between its convs and the next block's first conv; the stem BN after the fixed conv."""
    model = build_model("resnet_tiny", num_classes=10, stem="small", first_last="int8", block_order="conv_bn_relu")
    set_bits(model, {"layer1.0.conv1": 2, "layer1.0.conv2": 3, "layer2.0.conv1": 4})
    assert model.layer1[0].bn1.transition == (2, 3)
    assert model.layer1[0].bn2.transition == (3, 4)
    # The block output feeds two quantized convs of the next block (conv1 and the downsample conv): its BNs
    # are keyed by conv1 alone, so the downsample conv's bits select nothing.
    set_bits(model, {"layer2.0.downsample.0": 2})
    assert model.layer1[0].bn2.transition == (3, 4)
    set_bits(model, 2)
    assert model.bn1.transition == (8, 2)
    assert model.layer4[0].bn2.transition == (2, 8) and model.layer4[0].downsample[1].transition == (2, 8)


@pytest.mark.parametrize("block_order", ["conv_bn_relu", "bn_quantize_conv"])
def test_state_dict_round_trip_keeps_every_pair(block_order):
    """All (i, j) entries are saved in state_dict and loaded back into a fresh model (both block orders)."""
    source = build_model("resnet_tiny", num_classes=10, stem="small", block_order=block_order)
    randomise_entries(source)
    state = source.state_dict()
    bn = f"layer1.0.{BETWEEN_CONV1_AND_CONV2[block_order]}."
    assert state[bn + "weight"].shape[0] == state[bn + "running_var"].shape[0] == 9  # one row per pair
    target = build_model("resnet_tiny", num_classes=10, stem="small", block_order=block_order)
    target.load_state_dict(state)
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, state[k], msg=k)


def test_copies_keep_their_own_wiring():
    """A deep copy (e.g. a frozen teacher made from the student) switches its own BNs, not the original's."""
    import copy
    model = build_model("resnet_tiny", num_classes=10, stem="small")
    twin = copy.deepcopy(model)
    set_bits(twin, 2)
    assert twin.layer1[0].bn2.transition == (2, 2) and model.layer1[0].bn2.transition == (4, 4)


def test_per_bit_mode_keys_by_the_layer_the_bn_feeds():
    """bn="per_bit" (Table 1's "w/o Transitional BN"): one BN per bit-width j of layer l, the conv the BN
    feeds, whatever the previous layer's i; before the fixed FC, the previous layer's bits key it."""
    model = build_model("resnet_tiny", num_classes=10, stem="small", bn="per_bit", block_order="bn_quantize_conv")
    set_bits(model, {"layer1.0.conv1": 3, "layer1.0.conv2": 2, "layer4.0.conv2": 2})
    assert model.layer1[0].bn2.transition == 2 and model.layer1[0].bn1.transition == 3
    assert model.bn_out.transition == 2  # the FC is fixed: keyed by the last conv
    classic = build_model("resnet_tiny", num_classes=10, stem="small", bn="per_bit")
    set_bits(classic, {"layer1.0.conv1": 3, "layer1.0.conv2": 2, "layer2.0.conv1": 4})
    assert classic.layer1[0].bn1.transition == 2  # between conv1 (3 bits) and conv2 (2 bits)
    assert classic.layer1[0].bn2.transition == 4  # feeds layer2.0.conv1
    set_bits(classic, {"layer4.0.conv2": 3})
    assert classic.layer4[0].bn2.transition == 3  # feeds the fixed FC: keyed by its own conv


def test_stage_three_seeding_copies_uniform_entries_into_mixed_ones():
    """Stage III must not start its mixed (i, j) entries from the untrained defaults: each takes the
    statistics and affine parameters of the uniform (i, i) entry, and the uniform entries stay as they were."""
    from bitmixer_core import TransitionalBatchNorm2d, seed_mixed_transitions

    net = torch.nn.Sequential(TransitionalBatchNorm2d(4, (2, 3, 4)))
    tbn = net[0]
    for k, (i, j) in enumerate(tbn.entry_keys):
        entry = tbn.entries[k]
        entry.running_mean.fill_(10 * i + j)
        entry.weight.data.fill_(100 * i + j)
    assert seed_mixed_transitions(net) == 6
    for k, (i, j) in enumerate(tbn.entry_keys):
        assert torch.all(tbn.entries[k].running_mean == 11 * i), (i, j)
        assert torch.all(tbn.entries[k].weight == 101 * i), (i, j)
    shared = torch.nn.Sequential(TransitionalBatchNorm2d(4, (2, 3, 4), mode="shared"))
    assert seed_mixed_transitions(shared) == 0


@pytest.mark.parametrize("mode", ["per_bit", "shared"])
def test_a_stage_two_model_loads_into_one_bn_per_bit_width(mode):
    """Table 1's "w/o Transitional BN" starts from the Stage II meta-network: every weight and step size
    is copied, and each per-bit entry b takes the trained uniform entry (b, b) (shared: (max, max)); at a
    uniform bit-width the converted model computes what the source does."""
    from bitmixer_core import load_across_bn_modes
    torch.manual_seed(0)
    source = build_model("resnet_tiny", num_classes=10, stem="small")
    randomise_entries(source)
    target = build_model("resnet_tiny", num_classes=10, stem="small", bn=mode)
    load_across_bn_modes(target, source)
    source.eval(), target.eval()
    x = torch.randn(2, 3, 16, 16)
    calibrate_activation_step_sizes(source, x)
    load_across_bn_modes(target, source)
    for bits in ((2, 3, 4) if mode == "per_bit" else (4,)):
        set_bits(source, bits), set_bits(target, bits)
        torch.testing.assert_close(target(x), source(x))
    with pytest.raises(ValueError, match="same architecture"):
        load_across_bn_modes(build_model("ebn_tiny", num_classes=10, stem="small", bn=mode), source)


def test_an_entry_normalises_as_a_batchnorm2d_holding_its_row():
    """Entry k of the stacked tensors behaves as an nn.BatchNorm2d with row k's values: the same output and
    the same running-statistics update in training, the same output in eval; the other rows stay as they were."""
    torch.manual_seed(0)
    tbn = TransitionalBatchNorm2d(6, (2, 3, 4))
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 1.5)
        tbn.bias.normal_()
        tbn.running_mean.normal_()
        tbn.running_var.uniform_(0.5, 1.5)
    tbn.set_transition(3, 2)
    k = tbn.entry_keys.index((3, 2))
    reference = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(reference, name).copy_(getattr(tbn, name)[k])
    before = {name: getattr(tbn, name).detach().clone() for name in ("weight", "running_mean", "running_var")}
    x = torch.randn(8, 6, 5, 5) * 3 + 1
    for mode in ("train", "eval"):
        getattr(tbn, mode)(), getattr(reference, mode)()
        # Both compute in float32 with the same kernel: the results are bit-identical.
        assert torch.equal(tbn(x), reference(x)), mode
    assert torch.equal(tbn.running_mean[k], reference.running_mean)
    assert torch.equal(tbn.running_var[k], reference.running_var)
    assert int(tbn.num_batches_tracked[k]) == 1 and int(tbn.num_batches_tracked.sum()) == 1
    others = [i for i in range(len(tbn)) if i != k]
    for name, old in before.items():
        assert torch.equal(getattr(tbn, name)[others], old[others]), name


def test_a_checkpoint_with_one_batchnorm_per_entry_still_loads():
    """State dicts written when each entry was its own BatchNorm2d (`entries.<k>.weight`, ...) load into the
    stacked rows, entry by entry."""
    model = build_model("resnet_tiny", num_classes=10, stem="small")
    randomise_entries(model)
    state = model.state_dict()
    former = {}
    for key, value in state.items():
        module, _, name = key.rpartition(".")
        bn = model.get_submodule(module) if module else None
        if isinstance(bn, TransitionalBatchNorm2d):
            for k in range(len(bn)):
                former[f"{module}.entries.{k}.{name}"] = value[k].clone()
        else:
            former[key] = value
    fresh = build_model("resnet_tiny", num_classes=10, stem="small")
    fresh.load_state_dict(former)  # strict: every former key is used and every stacked key is filled
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
