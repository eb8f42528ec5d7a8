"""The architectures of section 5.1 as data: one entry per variant, all built by the one ResNet class."""

from __future__ import annotations

from ..bitwidths import BitWidths
from ..quantizer import QuantizerOptions
from .resnet import ResNet, ResNetSpec

RESNET18_WIDTHS = (64, 128, 256, 512)
# EBN (Bulat et al., ICLR 2021) as used by Bit-Mixer: 4 stages of 2 basic blocks, twice ResNet-18's width,
# grouped 3x3 convolutions with G0:G1:G2:G3 groups per stage, no expert convolutions.
EBN_WIDTHS = tuple(2 * w for w in RESNET18_WIDTHS)

MODEL_SPECS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec("basic", (2, 2, 2, 2), RESNET18_WIDTHS),
    "resnet34": ResNetSpec("basic", (3, 4, 6, 3), RESNET18_WIDTHS),
    "resnet50": ResNetSpec("bottleneck", (3, 4, 6, 3), RESNET18_WIDTHS),
    "ebn_4_8_8_16": ResNetSpec("basic", (2, 2, 2, 2), EBN_WIDTHS, groups=(4, 8, 8, 16), stem_width=128),
    "ebn_4_8_16_32": ResNetSpec("basic", (2, 2, 2, 2), EBN_WIDTHS, groups=(4, 8, 16, 32), stem_width=128),
    "ebn_4_4_4_4": ResNetSpec("basic", (2, 2, 2, 2), EBN_WIDTHS, groups=(4, 4, 4, 4), stem_width=128),
    # Small variants for tests and the embedded demo: cheap on CPU at 32x32.
    "resnet_tiny": ResNetSpec("basic", (1, 1, 1, 1), (8, 16, 32, 64), stem_width=8),
    "ebn_tiny": ResNetSpec("basic", (1, 1, 1, 1), (16, 32, 64, 128), groups=(2, 2, 4, 4), stem_width=16),
}

BN_MODES = ("transitional", "per_bit", "shared")


def available_models() -> list[str]:
    return list(MODEL_SPECS)


def build_model(
    name: str,
    *,
    num_classes: int,
    bits=BitWidths.same((2, 3, 4)),
    stem: str = "imagenet",
    first_last: str = "fp32",
    bn: str = "transitional",
    quantizer=QuantizerOptions(),
    block_order: str = "conv_bn_relu",
) -> ResNet:
    """Build a Bit-Mixer meta-network. Options are plain data (a YAML config passes them unchanged):
    bits may be BitWidths, a list ([2, 3, 4]) or {"weights": [...], "activations": [...]}; quantizer may
    be QuantizerOptions or a mapping of its fields. first_last says what the first conv and the last FC
    are: "fp32" (full precision) or "int8" (fixed 8-bit, own step sizes, never switched). block_order says
    where the quantizers sit (see models/resnet.py): "conv_bn_relu" (classic order, unsigned activation range,
    the default) or "bn_quantize_conv" (BN -> quantizer -> conv, signed inputs)."""
    if name not in MODEL_SPECS:
        raise ValueError(f"unknown model {name!r}; choose one of {available_models()}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}.")
    return ResNet(
        MODEL_SPECS[name],
        num_classes=num_classes,
        bits=BitWidths.coerce(bits),
        stem=stem,
        first_last=first_last,
        bn=bn,
        quantizer=QuantizerOptions.coerce(quantizer),
        block_order=block_order,
    )
