"""Transitional BN (section 3.2): one entry per (previous bits, next bits) pair, chosen from the assignment."""

import pytest
import torch

from bitmixer_core import TransitionalBatchNorm2d, build_model, set_bits, set_quantization


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
    """Between layer1.0.conv2 (previous) and layer2.0.conv1 (next): changing only the previous layer's
    bits selects another (i, j) entry, and the BN output changes with it."""
    model = build_model("resnet_tiny", num_classes=10, stem="small")
    randomise_entries(model)
    model.eval()
    bn = model.layer1[0].bn2
    set_bits(model, 4)
    x = torch.randn(2, bn.num_features, 5, 5)
    assert bn.transition == (4, 4)
    out_44 = bn(x)
    set_bits(model, {"layer1.0.conv2": 2})
    assert bn.transition == (2, 4)
    assert not torch.allclose(bn(x), out_44)
    set_bits(model, {"layer2.0.conv1": 3})
    assert bn.transition == (2, 3)


def test_fixed_sides_and_fp32_mode():
    """The stem BN's previous side is the fixed first conv (32 bits when FP32, 8 when int8); the last
    block's BNs feed the fixed FC; with activations not quantized every BN uses its (max, max) entry."""
    model = build_model("resnet_tiny", num_classes=10, stem="small", first_last="int8")
    set_bits(model, 2)
    assert model.bn1.transition == (8, 2)
    assert model.layer4[0].bn2.transition == (2, 8)
    assert model.layer4[0].downsample[1].transition == (2, 8)
    set_quantization(model, weights=False, activations=False)
    assert model.layer1[0].bn1.transition == (4, 4) and model.bn1.transition == (8, 4)
    fp = build_model("resnet_tiny", num_classes=10, stem="small")
    assert fp.bn1.previous_bits == (32,) and fp.layer4[0].bn2.next_bits == (32,)


def test_state_dict_round_trip_keeps_every_pair():
    """All (i, j) entries are saved in state_dict and loaded back into a fresh model."""
    source = build_model("resnet_tiny", num_classes=10, stem="small")
    randomise_entries(source)
    state = source.state_dict()
    assert sum(k.startswith("layer1.0.bn1.entries.") and k.endswith(".weight") for k in state) == 9
    target = build_model("resnet_tiny", num_classes=10, stem="small")
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


def test_per_bit_mode_keys_by_the_producing_layer():
    """bn="per_bit" (AdaBits-style ablation) keys a BN by its previous layer's bits, or by the next
    layer's when the previous one has a fixed precision."""
    model = build_model("resnet_tiny", num_classes=10, stem="small", bn="per_bit")
    set_bits(model, {"layer1.0.conv2": 2, "layer1.0.conv1": 3})
    assert model.layer1[0].bn2.transition == 2
    assert model.bn1.transition == 3


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
