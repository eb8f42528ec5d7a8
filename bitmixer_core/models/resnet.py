"""One ResNet class for every architecture of section 5.1 (ResNet-18/34/50 and EBN); variants are data.

Block order. Eq. 2 quantizes into a symmetric range (-m_b, m_b), which assumes a signed input (footnote 1:
binary activations are sign(x)); a post-ReLU tensor through it keeps half the states and makes 1 bit a
constant. Two orders are built, each giving every quantizer a range its input fills:

- "conv_bn_relu" (default): the classic ResNet order (conv -> BN -> ReLU, ReLU after the sum). Every
  quantized conv reads a post-ReLU tensor, so its activations use the unsigned range [0, 2**b - 1]
  (quantizer.py); weights keep Eq. 2's signed range.
- "bn_quantize_conv": every quantized conv reads BN -> quantizer -> conv, and the ReLU follows the conv,
  as in the binary and low-bit networks of Bulat & Tzimiropoulos that the paper builds on. The quantizer
  sees a zero-centred, signed tensor, so Eq. 2 is used as written. Residual sums are not rectified
  (pre-activation style); a final BN and ReLU precede the pool.

Measured side by side on the fidelity preset (docs/benchmarks.md, "Fidelity"), the classic order with the
unsigned range is more accurate at every bit-width, keeps Stage III within the noise of Stage II, and its
searched sub-nets beat random ones; BN-first loses 3.5 points at 4 bits in Stage III. Hence the default.

Transitional BN (section 3.2). "If i is the bit-width of layer l-1 and j of layer l, we learn gamma_ij,
beta_ij": the BN keyed (i, j) is the one whose input comes from layer l-1 and whose output feeds layer l.

- bn_quantize_conv: each quantized conv owns the BN just before its quantizer, keyed by (bits of the layer
  that produced the BN's input, bits of the conv). The block input feeds two convs in a downsampling
  block (main path and shortcut): each has its own BN, so each key names exactly the two layers it sits
  between. The block input is a residual sum; its producer is taken to be the previous block's last
  main-path conv (the sum's only switchable term besides the identity), or the stem for the first block.
  The stem's BN sees only the fixed-precision first conv, so it is a plain BN; the final BN sits between
  the last block's conv and the fixed-precision FC.
- conv_bn_relu: bn_k sits between conv_k and conv_{k+1}; a block's output BNs (main path and downsample)
  feed the next block, whose first conv is taken as "next" (the downsample conv exists only in the first
  block of a stage, so keying by it would be inconsistent across blocks).

A fixed-precision side (the FP32 or 8-bit first conv and last FC) has one key, 32 or 8 bits.

Speed (conv_bn_relu): inside a block, the ReLU between bn_k and conv_{k+1} is skipped once conv_{k+1}'s
unsigned quantizer maps every negative value as 0 anyway (QuantizedLayerMixin.rectifies_input): the same
outputs and gradients, bit for bit, for one pass less each way. `set_reference_path` keeps every ReLU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import fused_regions
from ..bitwidths import BitWidths
from ..layers import QConv2d, QLinear, QuantizedLayerMixin
from ..quantizer import QuantizerOptions
from ..transitional_bn import Float32BatchNorm2d, TransitionalBatchNorm2d

FIXED_INT8 = BitWidths.same((8,))
BLOCK_ORDERS = ("bn_quantize_conv", "conv_bn_relu")


@dataclass(frozen=True)
class ResNetSpec:
    """A ResNet variant: block type, blocks per stage, stage widths, 3x3 conv groups per stage."""

    block: str  # "basic" | "bottleneck"
    blocks: tuple[int, ...]
    widths: tuple[int, ...]
    groups: tuple[int, ...] = (1, 1, 1, 1)
    stem_width: int = 64


class _LayerFactory:
    """Builds the network's convs and BNs: quantized (the meta-network) or plain (the benchmark's baseline)."""

    def __init__(self, bits: BitWidths, quantizer: QuantizerOptions, bn: str, plain: bool, block_order: str):
        self.bits, self.quantizer, self.bn, self.plain = bits, quantizer, bn, plain
        self.norm_first = block_order == "bn_quantize_conv"

    def conv(self, cin, cout, k, stride=1, groups=1):
        if self.plain:
            return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        return QConv2d(cin, cout, k, stride, k // 2, groups=groups, bits=self.bits, quantizer=self.quantizer,
                       signed_input=self.norm_first)  # classic order: post-ReLU, never negative

    def norm(self, channels, previous_bits=None, next_bits=None):
        if self.plain:
            return nn.BatchNorm2d(channels)
        acts = self.bits.activations
        return TransitionalBatchNorm2d(channels, acts, self.bn, previous_bits=previous_bits or acts,
                                       next_bits=next_bits or acts)


class ResidualBlock(nn.Module):
    """A residual block of `len(convs)` quantized convs (conv1, bn1, conv2, bn2, ...) and a shortcut.

    `convs` lists (in, out, kernel, stride, groups) of the main path; BasicBlock and Bottleneck are two
    such lists. The shortcut is the identity, or a strided 1x1 conv with its BN when the shape changes.
    `input_bits` / `next_bits` are the one key of a fixed-precision side: the stem before the first block
    (BN-first order) or the FC after the last one (classic order)."""

    bitmixer_block = True

    def __init__(self, make: _LayerFactory, convs, cin, cout, stride, order: str, input_bits=None,
                 next_bits=None):
        super().__init__()
        self.order, self.depth = order, len(convs)
        norm_first = order == "bn_quantize_conv"
        for k, (c_in, c_out, kernel, s, groups) in enumerate(convs, start=1):
            conv = make.conv(c_in, c_out, kernel, s, groups)
            last = k == len(convs)
            if norm_first:
                norm = make.norm(c_in, previous_bits=input_bits if k == 1 else None)
            else:
                norm = make.norm(c_out, next_bits=next_bits if last else None)
            setattr(self, f"conv{k}", conv)  # registered before the BN: quantized_layers keeps forward order
            setattr(self, f"bn{k}", norm)
        self.downsample = None
        if stride != 1 or cin != cout:
            conv = make.conv(cin, cout, 1, stride)
            self.downsample = (nn.Sequential(make.norm(cin, previous_bits=input_bits), conv) if norm_first
                               else nn.Sequential(conv, make.norm(cout, next_bits=next_bits)))
        self.relu = nn.ReLU(inplace=True)

    def main_path(self):
        return [(getattr(self, f"conv{k}"), getattr(self, f"bn{k}")) for k in range(1, self.depth + 1)]

    def first_conv(self):
        return self.conv1

    def last_conv(self):
        return getattr(self, f"conv{self.depth}")

    def forward(self, x):
        out = x
        if self.order == "bn_quantize_conv":
            for k, (conv, norm) in enumerate(self.main_path(), start=1):
                out = conv(norm(out))
                if k < self.depth:
                    out = self.relu(out)
            return out + (x if self.downsample is None else self.downsample(x))
        convs = self.main_path()
        for k, (conv, norm) in enumerate(convs, start=1):
            out = norm(conv(out))
            # Inside the block the ReLU's only reader is the next conv; one whose quantizer already maps
            # every negative value as 0 (QuantizedLayerMixin.rectifies_input) makes it redundant: skipped,
            # with bit-identical outputs and gradients. The block output keeps its ReLU (the shortcut reads it).
            if k < self.depth and not (isinstance(convs[k][0], QuantizedLayerMixin) and convs[k][0].rectifies_input()):
                out = self.relu(out)
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    def wire(self, producer, following) -> None:
        """Tell each BN its (previous, next) layers: `producer` made the block input, `following` reads the
        block output (used by the classic order only)."""
        convs = [conv for conv, _ in self.main_path()]
        if self.order == "bn_quantize_conv":
            for k, (conv, norm) in enumerate(self.main_path()):
                norm.wire(producer if k == 0 else convs[k - 1], conv)
            if self.downsample is not None:
                self.downsample[0].wire(producer, self.downsample[1])
            return
        for k, (conv, norm) in enumerate(self.main_path()):
            norm.wire(conv, convs[k + 1] if k + 1 < len(convs) else following)
        if self.downsample is not None:
            self.downsample[1].wire(self.downsample[0], following)


def basic_block(make, cin, width, stride, groups, order, input_bits=None, next_bits=None) -> ResidualBlock:
    """Two 3x3 convs (ResNet-18/34, EBN)."""
    convs = [(cin, width, 3, stride, groups), (width, width, 3, 1, groups)]
    return ResidualBlock(make, convs, cin, width, stride, order, input_bits, next_bits)


def bottleneck_block(make, cin, width, stride, groups, order, input_bits=None, next_bits=None) -> ResidualBlock:
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50)."""
    convs = [(cin, width, 1, 1, 1), (width, width, 3, stride, groups), (width, 4 * width, 1, 1, 1)]
    return ResidualBlock(make, convs, cin, 4 * width, stride, order, input_bits, next_bits)


BLOCKS = {"basic": (basic_block, 1), "bottleneck": (bottleneck_block, 4)}  # builder, channel expansion


class ResNet(nn.Module):
    def __init__(
        self,
        spec: ResNetSpec,
        *,
        num_classes: int,
        bits: BitWidths = BitWidths(),
        stem: str = "imagenet",
        first_last: str = "fp32",
        bn: str = "transitional",
        quantizer: QuantizerOptions = QuantizerOptions(),
        block_order: str = "conv_bn_relu",
        plain: bool = False,
    ):
        super().__init__()
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' (224x224 input) or 'small' (32x32 input), got {stem!r}.")
        if first_last not in ("fp32", "int8"):
            raise ValueError(f"first_last must be 'fp32' or 'int8', got {first_last!r}.")
        if spec.block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {spec.block!r}.")
        if block_order not in BLOCK_ORDERS:
            raise ValueError(f"block_order must be one of {BLOCK_ORDERS}, got {block_order!r}.")
        self.spec, self.stem_kind, self.first_last, self.block_order = spec, stem, first_last, block_order
        self.compiled_regions = False  # fused_regions.compile_fused_regions: the opt-in compiled training path
        norm_first = block_order == "bn_quantize_conv"
        make = _LayerFactory(bits, quantizer, bn, plain, block_order)
        fixed_bits = 32 if first_last == "fp32" else 8
        build_block, expansion = BLOCKS[spec.block]

        # Stem: the first conv is never switched (full precision or 8 bits); its input is the signed image.
        k, s = (7, 2) if stem == "imagenet" else (3, 1)
        if first_last == "fp32" or plain:
            self.conv1 = nn.Conv2d(3, spec.stem_width, k, s, k // 2, bias=False)
        else:
            self.conv1 = QConv2d(3, spec.stem_width, k, s, k // 2, bits=FIXED_INT8, quantizer=quantizer,
                                 switchable=False)
        # With BN before every quantizer, the stem BN sees only the fixed first conv: one plain BN.
        self.bn1 = (nn.BatchNorm2d(spec.stem_width) if plain else Float32BatchNorm2d(spec.stem_width) if norm_first
                    else make.norm(spec.stem_width, previous_bits=(fixed_bits,)))
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()

        stages = []
        cin = spec.stem_width
        for i, (n_blocks, width, groups) in enumerate(zip(spec.blocks, spec.widths, spec.groups)):
            blocks = []
            for b in range(n_blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                is_first, is_last = i == 0 and b == 0, i == len(spec.blocks) - 1 and b == n_blocks - 1
                # BN-first order: the first block's input BNs follow the fixed-precision stem (one key);
                # classic order: the last block's output BNs feed the fixed-precision FC (one key).
                input_bits = (fixed_bits,) if is_first and norm_first else None
                next_bits = (fixed_bits,) if is_last and not norm_first else None
                blocks.append(build_block(make, cin, width, stride, groups, block_order, input_bits, next_bits))
                cin = width * expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = len(stages)
        for i, stage in enumerate(stages, start=1):
            setattr(self, f"layer{i}", stage)
        # Pre-activation style: the residual stream is normalised and rectified once, before the pool.
        self.bn_out = make.norm(cin, next_bits=(fixed_bits,)) if norm_first else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if first_last == "fp32" or plain:
            self.fc = nn.Linear(cin, num_classes)
        else:  # its input is post-ReLU in both orders: the unsigned 8-bit range
            self.fc = QLinear(cin, num_classes, bits=FIXED_INT8, quantizer=quantizer, switchable=False,
                              signed_input=False)

        self._init_weights()
        if not plain:
            self._wire_transitions(stages, fixed_bits)

    def _wire_transitions(self, stages, fixed_bits):
        """Tell every Transitional BN which layers sit on each side (see the module docstring)."""
        blocks = [blk for stage in stages for blk in stage]
        first = self.conv1 if isinstance(self.conv1, QuantizedLayerMixin) else fixed_bits
        fc = self.fc if isinstance(self.fc, QuantizedLayerMixin) else fixed_bits
        if isinstance(self.bn1, TransitionalBatchNorm2d):
            self.bn1.wire(first, blocks[0].first_conv())
        producer = first
        for i, blk in enumerate(blocks):
            blk.wire(producer, blocks[i + 1].first_conv() if i + 1 < len(blocks) else fc)
            producer = blk.last_conv()
        if isinstance(self.bn_out, TransitionalBatchNorm2d):
            self.bn_out.wire(producer, fc)
        for m in self.modules():
            if isinstance(m, TransitionalBatchNorm2d):
                m.refresh()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, QuantizedLayerMixin):
                m.reset_weight_step_sizes()  # the weights changed since the layers were built

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled_regions and self.training and torch.is_grad_enabled():
            return fused_regions.forward(self, x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.stages + 1):
            x = getattr(self, f"layer{i}")(x)
        if self.block_order == "bn_quantize_conv":
            x = self.relu(self.bn_out(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))
