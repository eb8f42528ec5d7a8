"""One ResNet class for every architecture of section 5.1 (ResNet-18/34/50 and EBN); variants are data.

Every BN is a TransitionalBatchNorm2d wired to the quantized layer that produced its input ("previous")
and the quantized layer that consumes its output ("next"):

- inside a block, bn_k sits between conv_k (previous) and conv_{k+1} (next);
- across a residual connection, the block's last BN and its downsample BN both feed the sum whose output
  is the input of the next block. That input is consumed by two convs of the next block: its first conv
  (main path) and, when present, its downsample conv. We take the first conv as "next": it is the layer of
  the main path the paper's "layer l-1 -> layer l" transition describes, and the downsample shortcut
  exists only in the first block of a stage, so keying by it would be inconsistent across blocks;
- the stem BN's previous layer is the fixed-precision first conv (32 or 8 bits, one key);
- the last block's BNs feed the fixed-precision FC (32 or 8 bits, one key) through the average pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..bitwidths import BitWidths
from ..layers import QConv2d, QLinear, QuantizedLayerMixin
from ..quantizer import QuantizerOptions
from ..transitional_bn import TransitionalBatchNorm2d

FIXED_INT8 = BitWidths.same((8,))


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

    def __init__(self, bits: BitWidths, quantizer: QuantizerOptions, bn: str, plain: bool):
        self.bits, self.quantizer, self.bn, self.plain = bits, quantizer, bn, plain

    def conv(self, cin, cout, k, stride=1, groups=1):
        if self.plain:
            return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        return QConv2d(cin, cout, k, stride, k // 2, groups=groups, bits=self.bits, quantizer=self.quantizer)

    def norm(self, channels, previous_bits=None, next_bits=None):
        if self.plain:
            return nn.BatchNorm2d(channels)
        acts = self.bits.activations
        return TransitionalBatchNorm2d(channels, acts, self.bn, previous_bits=previous_bits or acts,
                                       next_bits=next_bits or acts)


class _ResidualBlock(nn.Module):
    """What both block types share: the shortcut, and which BNs feed the next block."""

    bitmixer_block = True
    output_norm_name = output_conv_name = ""  # the main path's last BN and the conv before it

    def _add_shortcut(self, make: _LayerFactory, cin, cout, stride, next_bits):
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(make.conv(cin, cout, 1, stride), make.norm(cout, next_bits=next_bits))
        self.relu = nn.ReLU(inplace=True)

    def output_norms(self):
        """(BN, the conv that produced its input) for the BNs that feed the next block."""
        out = [(getattr(self, self.output_norm_name), getattr(self, self.output_conv_name))]
        if self.downsample is not None:
            out.append((self.downsample[1], self.downsample[0]))
        return out

    def first_conv(self):
        return self.conv1

    def _add_identity(self, out, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class BasicBlock(_ResidualBlock):
    expansion = 1
    output_norm_name, output_conv_name = "bn2", "conv2"

    def __init__(self, make: _LayerFactory, cin, width, stride, groups, next_bits=None):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = make.conv(cin, width, 3, stride, groups)
        self.bn1 = make.norm(width)
        self.conv2 = make.conv(width, cout, 3, 1, groups)
        self.bn2 = make.norm(cout, next_bits=next_bits)
        self._add_shortcut(make, cin, cout, stride, next_bits)

    def internal_transitions(self):
        return [(self.bn1, self.conv1, self.conv2)]

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self._add_identity(self.bn2(self.conv2(out)), x)


class Bottleneck(_ResidualBlock):
    expansion = 4
    output_norm_name, output_conv_name = "bn3", "conv3"

    def __init__(self, make: _LayerFactory, cin, width, stride, groups, next_bits=None):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = make.conv(cin, width, 1)
        self.bn1 = make.norm(width)
        self.conv2 = make.conv(width, width, 3, stride, groups)
        self.bn2 = make.norm(width)
        self.conv3 = make.conv(width, cout, 1)
        self.bn3 = make.norm(cout, next_bits=next_bits)
        self._add_shortcut(make, cin, cout, stride, next_bits)

    def internal_transitions(self):
        return [(self.bn1, self.conv1, self.conv2), (self.bn2, self.conv2, self.conv3)]

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._add_identity(self.bn3(self.conv3(out)), x)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


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
        plain: bool = False,
    ):
        super().__init__()
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' (224x224 input) or 'small' (32x32 input), got {stem!r}.")
        if first_last not in ("fp32", "int8"):
            raise ValueError(f"first_last must be 'fp32' or 'int8', got {first_last!r}.")
        if spec.block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {spec.block!r}.")
        self.spec, self.stem_kind, self.first_last = spec, stem, first_last
        make = _LayerFactory(bits, quantizer, bn, plain)
        fixed_bits = 32 if first_last == "fp32" else 8
        block_cls = BLOCKS[spec.block]

        # Stem: the first conv is never switched (full precision or 8 bits).
        k, s = (7, 2) if stem == "imagenet" else (3, 1)
        if first_last == "fp32" or plain:
            self.conv1 = nn.Conv2d(3, spec.stem_width, k, s, k // 2, bias=False)
        else:
            self.conv1 = QConv2d(3, spec.stem_width, k, s, k // 2, bits=FIXED_INT8, quantizer=quantizer,
                                 switchable=False)
        self.bn1 = make.norm(spec.stem_width, previous_bits=(fixed_bits,))
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()

        stages = []
        cin = spec.stem_width
        for i, (n_blocks, width, groups) in enumerate(zip(spec.blocks, spec.widths, spec.groups)):
            blocks = []
            for b in range(n_blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                is_last = i == len(spec.blocks) - 1 and b == n_blocks - 1
                # The last block's output BNs feed the fixed-precision FC: their next side has one key.
                blocks.append(block_cls(make, cin, width, stride, groups, (fixed_bits,) if is_last else None))
                cin = width * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = len(stages)
        for i, stage in enumerate(stages, start=1):
            setattr(self, f"layer{i}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if first_last == "fp32" or plain:
            self.fc = nn.Linear(cin, num_classes)
        else:
            self.fc = QLinear(cin, num_classes, bits=FIXED_INT8, quantizer=quantizer, switchable=False)

        self._init_weights()
        if not plain:
            self._wire_transitions(stages, fixed_bits)

    def _wire_transitions(self, stages, fixed_bits):
        """Tell every Transitional BN which layers sit on each side (see the module docstring)."""
        blocks = [blk for stage in stages for blk in stage]
        first = self.conv1 if isinstance(self.conv1, QuantizedLayerMixin) else fixed_bits
        fc = self.fc if isinstance(self.fc, QuantizedLayerMixin) else fixed_bits
        self.bn1.wire(first, blocks[0].first_conv())
        for i, blk in enumerate(blocks):
            for norm, previous, nxt in blk.internal_transitions():
                norm.wire(previous, nxt)
            following = blocks[i + 1].first_conv() if i + 1 < len(blocks) else fc
            for norm, previous in blk.output_norms():
                norm.wire(previous, following)
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
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
