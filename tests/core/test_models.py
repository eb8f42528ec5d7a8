"""Models of section 5.1: registry, parameter counts, forward passes."""

import pytest
import torch

from bitmixer_core import (QConv2d, QLinear, TransitionalBatchNorm2d, available_models, build_model,
                           calibrate_activation_step_sizes, quantized_layers, set_bits)

TINY = ["resnet_tiny", "ebn_tiny"]


def build_shapes_only(name, **options):
    """Construction on the meta device: every parameter with its shape, no memory, no initialisation cost."""
    with torch.device("meta"):
        return build_model(name, **options)


def test_registry_lists_the_papers_architectures():
    """Every architecture of section 5.1 (and the tiny test variants) is a registry entry."""
    assert set(available_models()) >= {"resnet18", "resnet34", "resnet50", "ebn_4_8_8_16", "ebn_4_8_16_32",
                                       "ebn_4_4_4_4", "resnet_tiny", "ebn_tiny"}
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        build_model("resnet19", num_classes=10)
    with pytest.raises(ValueError, match="stem"):
        build_model("resnet_tiny", num_classes=10, stem="cifar")
    with pytest.raises(ValueError, match="first_last"):
        build_model("resnet_tiny", num_classes=10, first_last="int4")


def split_parameters(model):
    """(conv + FC parameters, BN parameters, step sizes)."""
    steps = sum(p.numel() for n, p in model.named_parameters() if n.endswith("step_size"))
    norms = sum(p.numel() for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, TransitionalBatchNorm2d))
                for p in m.parameters())
    return sum(p.numel() for p in model.parameters()) - steps - norms, norms, steps


def test_resnet18_has_standard_size_and_tbn_adds_under_one_percent():
    """ResNet-18 (ImageNet stem, FP32 first/last, one BN) has the standard 11,689,512 parameters besides
    step sizes in the classic block order; with BNs before the quantizers the convs and FC are the same
    and only the BNs' channel counts move (9,600 standard BN parameters become 8,832); Transitional BNs
    plus step sizes add under 1% for bits (2, 3, 4)."""
    classic = build_shapes_only("resnet18", num_classes=1000, bn="shared")
    weights, norms, _ = split_parameters(classic)
    assert weights + norms == 11_689_512 and norms == 9_600
    norm_first = build_shapes_only("resnet18", num_classes=1000, bn="shared", block_order="bn_quantize_conv")
    assert split_parameters(norm_first)[:2] == (weights, 8_832)
    full, full_norms, steps = split_parameters(build_shapes_only("resnet18", num_classes=1000))
    extra = full_norms + steps - 9_600
    print(f"\nresnet18: TBN + step sizes add {extra:,} parameters ({100 * extra / 11_689_512:.3f}%)")
    assert full == weights and 0 < extra / 11_689_512 < 0.01


def test_big_models_build_with_expected_structure():
    """ResNet-34/50 have their standard sizes (one BN); EBN uses grouped 3x3 convs G0:G1:G2:G3 at twice
    ResNet-18's width; every registered model builds (shapes only, to keep the test cheap)."""
    for name in available_models():
        assert sum(p.numel() for p in build_shapes_only(name, num_classes=10).parameters()) > 0
    sizes = {"resnet34": 21_797_672, "resnet50": 25_557_032}
    for name, size in sizes.items():
        model = build_shapes_only(name, num_classes=1000, bn="shared")
        assert sum(p.numel() for n, p in model.named_parameters() if not n.endswith("step_size")) == size
        norm_first = build_shapes_only(name, num_classes=1000, bn="shared", block_order="bn_quantize_conv")
        assert split_parameters(norm_first)[0] == split_parameters(model)[0]  # same convs and FC
    ebn = build_shapes_only("ebn_4_8_16_32", num_classes=1000)
    assert [ebn.layer1[0].conv1.groups, ebn.layer2[0].conv1.groups, ebn.layer3[1].conv2.groups,
            ebn.layer4[1].conv2.groups] == [4, 8, 16, 32]
    assert ebn.layer4[1].conv2.out_channels == 1024


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("first_last", ["fp32", "int8"])
def test_tiny_models_run_forward_and_backward_at_every_bit_width(name, first_last):
    """Tiny variants run at 32x32 with the small stem; first/last are plain (fp32) or fixed 8-bit."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, stem="small", first_last=first_last)
    x = torch.randn(4, 3, 32, 32)
    calibrate_activation_step_sizes(model, x)
    for bits in (2, 3, 4):
        set_bits(model, bits)
        out = model(x)
        assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.sum().backward()
    fixed = (QConv2d, QLinear) if first_last == "int8" else (torch.nn.Conv2d, torch.nn.Linear)
    assert isinstance(model.conv1, fixed[0]) and isinstance(model.fc, fixed[1])
    assert all(name not in ("conv1", "fc") for name, _ in quantized_layers(model))


def test_imagenet_stem_and_yaml_style_options():
    """The ImageNet stem downsamples by 4 before layer1; plain lists/mappings configure bits and quantizer."""
    model = build_model("resnet_tiny", num_classes=10, stem="imagenet",
                        bits={"weights": [1, 3, 4], "activations": [2, 3, 4]},
                        quantizer={"rounding": "round", "symmetric": False})
    x = torch.randn(2, 3, 64, 64)
    calibrate_activation_step_sizes(model, x)
    set_bits(model, 2)
    assert model(x).shape == (2, 10)
    assert model.layer1[0].conv1.weight_bits == 1
