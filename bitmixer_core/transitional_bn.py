"""Transitional Batch-Norm (section 3.2).

The BN that sits between quantized layer l-1 (the *previous* layer, which produced its input, at i bits)
and quantized layer l (the *next* layer, which consumes its output, at j bits) keeps separate gamma, beta
and running statistics for every (i, j) pair and uses the pair of the current assignment.

Entry k is row k of five stacked tensors: the parameters `weight` and `bias` and the buffers `running_mean`,
`running_var` and `num_batches_tracked`; `entry_keys[k]` names its (i, j) pair. Selecting a pair only
changes an integer: no parameter is copied. One parameter per kind rather than one BatchNorm2d per pair
matters for speed: ResNet-18's 20 Transitional BNs would otherwise hold 360 of its ~400 parameter tensors,
and an optimizer step pays several kernel launches per tensor (docs/benchmarks.md, "GPU"). An entry that
a step does not use gets a zero gradient in its row, as a separate parameter did under DeepSpeed, which
fills the gradient of every parameter that had none. Checkpoints with one BatchNorm2d per entry
(`entries.<k>.weight`, ...) still load.

A side whose layer has a fixed precision (the full-precision or 8-bit first conv and last FC) has a single
bit-width, e.g. (32,) or (8,), so that side contributes one key only.

Modes (Table 1 ablation):
- "transitional": one entry per (i, j) pair (the paper).
- "per_bit": one entry per bit-width j of layer l, the layer the BN feeds (AdaBits' BN per bit-width; the
  paper's Table 1 "w/o Transitional BN"), whatever the previous layer's i. When layer l has a fixed
  precision (the FC), its one bit-width keys nothing, so the previous layer's bits key the entries.
- "shared": one plain BN for every assignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("transitional", "per_bit", "shared")
ENTRY_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")  # one row per entry


def batch_norm_float32(x: torch.Tensor, running_mean, running_var, weight, bias, training: bool, momentum: float,
                       eps: float) -> torch.Tensor:
    """Batch norm with float32 statistics and affine parameters whatever the input dtype; returns the input's
    dtype. Under bf16 autocast the input is a bf16 convolution output: PyTorch's mixed-precision kernel
    accumulates it in float32 and writes bf16, so no float32 copy of the activation is made. The running
    statistics stay float32, where a running average still moves by updates of 1e-4 (bf16 resolves about
    0.4 % near 1 and stalls)."""
    return F.batch_norm(x, running_mean, running_var, weight.float(), bias.float(), training, momentum, eps)


class Float32BatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that normalises in float32 (`batch_norm_float32`): the stem BN of the BN-first order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return batch_norm_float32(x, self.running_mean if track else None, self.running_var if track else None,
                                  self.weight, self.bias, use_batch, factor, self.eps)


@dataclass(frozen=True)
class BatchNormEntry:
    """Entry k of a Transitional BN: views of row k of its stacked tensors (writing them writes the BN)."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor


class TransitionalBatchNorm2d(nn.Module):
    def __init__(
        self,
        num_features: int,
        bits: Iterable[int] = (2, 3, 4),
        mode: str = "transitional",
        *,
        previous_bits: Iterable[int] | None = None,
        next_bits: Iterable[int] | None = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"bn mode must be one of {MODES}, got {mode!r}.")
        self.num_features = num_features
        self.mode = mode
        self.previous_bits = tuple(bits if previous_bits is None else previous_bits)
        self.next_bits = tuple(bits if next_bits is None else next_bits)
        pairs = [(i, j) for i in self.previous_bits for j in self.next_bits]
        if mode == "transitional":
            keys = pairs
            lookup = {p: k for k, p in enumerate(pairs)}
        elif mode == "per_bit":
            by_next = len(self.next_bits) > 1
            keys = list(self.next_bits if by_next else self.previous_bits)
            lookup = {(i, j): keys.index(j if by_next else i) for i, j in pairs}
        else:
            keys = ["shared"]
            lookup = {p: 0 for p in pairs}
        self.entry_keys = keys
        self._lookup = lookup
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(len(keys), num_features))
        self.bias = nn.Parameter(torch.zeros(len(keys), num_features))
        self.register_buffer("running_mean", torch.zeros(len(keys), num_features))
        self.register_buffer("running_var", torch.ones(len(keys), num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(len(keys), dtype=torch.long))
        self.register_load_state_dict_pre_hook(_stack_entry_modules)
        # Start at the (max, max) pair.
        self._active = lookup[(self.previous_bits[-1], self.next_bits[-1])]
        # Wiring to the layers on each side (plain references, not sub-modules): see `wire`.
        self._previous_layer = None
        self._next_layer = None

    # -- selection -------------------------------------------------------------------------------
    def set_transition(self, previous_bits: int, next_bits: int) -> None:
        """Use the entry of the transition previous layer at `previous_bits` -> next layer at `next_bits`."""
        try:
            self._active = self._lookup[(previous_bits, next_bits)]
        except KeyError:
            raise ValueError(
                f"no Transitional BN entry for the transition {previous_bits} -> {next_bits} bits; "
                f"this BN was built for previous bits {self.previous_bits} and next bits {self.next_bits}."
            ) from None

    def __len__(self) -> int:
        """The number of entries (one per key)."""
        return len(self.entry_keys)

    def entry(self, index: int) -> BatchNormEntry:
        return BatchNormEntry(*(getattr(self, name)[index] for name in ENTRY_TENSORS))

    @property
    def entries(self) -> list[BatchNormEntry]:
        return [self.entry(k) for k in range(len(self))]

    @property
    def active_entry(self) -> BatchNormEntry:
        return self.entry(self._active)

    @torch.no_grad()
    def copy_entry(self, source: int, target: int) -> None:
        """Entry `target` takes entry `source`'s parameters and statistics."""
        for name in ENTRY_TENSORS:
            getattr(self, name)[target] = getattr(self, name)[source]

    @torch.no_grad()
    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    @property
    def transition(self):
        return self.entry_keys[self._active]

    @torch.no_grad()
    def seed_mixed_transitions(self) -> int:
        """Copy each uniform entry (i, i) into the mixed entries (i, j), j != i; returns how many were seeded.

        Stages I and II draw one bit-width for the whole network, so only the (i, i) entries learn; the
        mixed ones are still at their initial gamma = 1, beta = 0, mean 0, var 1 when Stage III starts.
        The input of this BN is the output of the previous layer at i bits, so (i, i) holds the statistics
        closest to those of (i, j): starting there lets the few Stage III updates each pair gets refine
        rather than build its statistics from nothing."""
        if self.mode != "transitional":
            return 0
        index = {key: k for k, key in enumerate(self.entry_keys)}
        seeded = 0
        for k, (i, j) in enumerate(self.entry_keys):
            source = index.get((i, i))
            if i == j or source is None:
                continue
            self.copy_entry(source, k)
            seeded += 1
        return seeded

    # -- wiring to the model's layers ------------------------------------------------------------
    def wire(self, previous, next) -> None:
        """Remember the layers on each side: a quantized layer, or an int for a fixed-precision side.

        Kept as plain Python references inside a tuple so that nn.Module does not register them twice.
        """
        self._previous_layer = (previous,)
        self._next_layer = (next,)

    def refresh(self) -> None:
        """Pick the entry from the wired layers' current bits ((max, max) when activations are FP32)."""
        if self._previous_layer is None:
            return
        self.set_transition(
            _side_bits(self._previous_layer[0], self.previous_bits),
            _side_bits(self._next_layer[0], self.next_bits),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._active
        factor = self.momentum
        if self.training:
            self.num_batches_tracked[k].add_(1)  # in place on the row's view (`t[k] += 1` would copy it back too)
            if self.momentum is None:  # a cumulative average, as nn.BatchNorm2d's momentum=None
                factor = 1.0 / float(self.num_batches_tracked[k])
        return batch_norm_float32(x, self.running_mean[k], self.running_var[k], self.weight[k], self.bias[k],
                                  self.training, factor or 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, mode={self.mode}, entries={len(self)}, transition={self.transition}"


def _stack_entry_modules(module, state_dict, prefix, *args) -> None:
    """Load a checkpoint written with one BatchNorm2d per entry (`entries.<k>.weight`, ...): stack its rows."""
    old = f"{prefix}entries."
    if not any(key.startswith(old) for key in state_dict):
        return
    for name in ENTRY_TENSORS:
        keys = [f"{old}{k}.{name}" for k in range(len(module.entry_keys))]
        if all(key in state_dict for key in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])


def _side_bits(layer, bit_set: tuple[int, ...]) -> int:
    if isinstance(layer, int):
        return layer
    if not layer.quantize_activations:  # FP32 (teacher) mode: use the (max, max) entry
        return bit_set[-1]
    return layer.bits


def seed_mixed_transitions(model: nn.Module) -> int:
    """Stage III's start: every Transitional BN copies its uniform (i, i) entries into its mixed (i, j) ones
    (see `TransitionalBatchNorm2d.seed_mixed_transitions`). Returns the number of entries seeded."""
    return sum(m.seed_mixed_transitions() for m in model.modules() if isinstance(m, TransitionalBatchNorm2d))


@torch.no_grad()
def load_across_bn_modes(target: nn.Module, source: nn.Module) -> None:
    """Load `source` into `target`, the same architecture built with another BN mode (Table 1 starts its
    "w/o Transitional BN" Stage III from the Stage II meta-network).

    Every parameter and buffer outside the Transitional BNs is copied by name. Each target BN entry takes
    the source entry of one of the (previous bits, next bits) pairs it serves, the uniform pair (b, b)
    when it has one: that is the entry Stages I and II trained (a per-bit entry b <- (b, b); the shared
    entry <- (max, max))."""
    source_bns = {n: m for n, m in source.named_modules() if isinstance(m, TransitionalBatchNorm2d)}
    target_bns = {n: m for n, m in target.named_modules() if isinstance(m, TransitionalBatchNorm2d)}
    if source_bns.keys() != target_bns.keys():
        raise ValueError("the two models place their Transitional BNs differently; they must be the same "
                         "architecture and block order.")
    inside = tuple(f"{n}." for n in target_bns)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(inside)}
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ
        raise ValueError(f"the models differ in shape; they must be the same architecture ({err}).") from None
    leftover = [k for k in missing if not k.startswith(inside)]
    if leftover or unexpected:
        raise ValueError(f"the models differ outside their BNs (missing {leftover[:3]}, unexpected "
                         f"{unexpected[:3]}); they must be the same architecture.")
    for name, bn in target_bns.items():
        src = source_bns[name]
        for index in range(len(bn)):
            pairs = [p for p, k in bn._lookup.items() if k == index]
            uniform = [p for p in pairs if p[0] == p[1]]
            pair = max(uniform) if uniform else pairs[-1]  # shared: (max, max); a fixed side: its last pair
            source = src._lookup[pair]
            for kind in ENTRY_TENSORS:
                getattr(bn, kind)[index] = getattr(src, kind)[source]
