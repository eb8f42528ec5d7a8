"""Bit-switchable layers (section 3.1): QConv2d and QLinear.

Each layer quantizes its weights and its input activations to the bit-width currently assigned to it, with
one learnable step size per bit-width, separately for weights (`weight_step_size`) and activations
(`activation_step_size`). Switching bit-width only changes a Python integer: nothing is allocated.

The step sizes are learned as their logarithms, so alpha = exp(theta) > 0 at every bit-width whatever the
optimizer does: with Adam each step moves a parameter by about the learning rate, which is larger than a
small alpha itself, and a plain alpha was seen to cross zero. Training code gives these no weight decay
(`step_size_parameters`). Both kinds are one parameter, `log_step_size` (row 0 the weights', row 1 the
activations'; `log_weight_step_size` and `log_activation_step_size` are views of its rows): a training step
pays the optimizer and DeepSpeed's gradient hooks per parameter tensor, so one tensor per layer rather than two
takes ResNet-18 from 100 tensors to 81. Checkpoints with the two separate parameters still load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bitwidths import BitWidths
from .quantizer import QuantizerOptions, fitted_step_size, quantize_log_step, quantize_nested

STEP_SIZE_KINDS = ("weight", "activation")  # the rows of a layer's `log_step_size`
WEIGHT_ROW, ACTIVATION_ROW = range(len(STEP_SIZE_KINDS))


class QuantizedLayerMixin:
    """State and behaviour shared by QConv2d and QLinear (weight in `self.weight`)."""

    def _init_quantization(self, bits, quantizer, switchable: bool, signed_input: bool) -> None:
        self.bit_widths = BitWidths.coerce(bits)
        self.quantizer = QuantizerOptions.coerce(quantizer)
        # A non-switchable layer (the 8-bit first conv / last FC) keeps its bits whatever set_bits says.
        self.switchable = switchable
        # Eq. 2's range is for a signed input; an input that is never negative uses [0, 2**b - 1].
        self.signed_input = bool(signed_input)
        self.quantize_weights = True
        self.quantize_activations = True
        self._bit_index = len(self.bit_widths) - 1  # start at the largest bit-width
        n = len(self.bit_widths)
        self.log_step_size = nn.Parameter(torch.zeros(len(STEP_SIZE_KINDS), n))
        self.register_load_state_dict_pre_hook(_stack_step_sizes)
        # Which activation step sizes hold a data-driven value (saved, so a resumed run does not re-init).
        self.register_buffer("activation_step_initialized", torch.zeros(n, dtype=torch.bool))
        self._activation_steps_ready = False  # Python cache of activation_step_initialized.all()
        self._calibrating = False
        # True: the reference path (every ReLU before this layer kept); False: the faster path with the same
        # outputs and gradients (rectifies_input; set_reference_path; tests/core/test_fast_path.py).
        self.reference_path = False
        self.register_load_state_dict_post_hook(_forget_ready_cache)
        self.reset_weight_step_sizes()

    # -- bit-width -------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Current bit-width (= activation bits)."""
        return self.bit_widths.activations[self._bit_index]

    @property
    def weight_bits(self) -> int:
        return self.bit_widths.weights[self._bit_index]

    def set_bit_width(self, bits: int) -> None:
        self._bit_index = self.bit_widths.index(bits)

    # -- step sizes ------------------------------------------------------------------------------
    @property
    def log_weight_step_size(self) -> torch.Tensor:
        """log alpha of the weights, one per bit-width (a view of `log_step_size`'s row)."""
        return self.log_step_size[WEIGHT_ROW]

    @property
    def log_activation_step_size(self) -> torch.Tensor:
        """log alpha of the input activations, one per bit-width (a view of `log_step_size`'s row)."""
        return self.log_step_size[ACTIVATION_ROW]

    @property
    def weight_step_size(self) -> torch.Tensor:
        """alpha of the weights, one per bit-width (always positive)."""
        return self.log_weight_step_size.exp()

    @property
    def activation_step_size(self) -> torch.Tensor:
        """alpha of the input activations, one per bit-width (always positive)."""
        return self.log_activation_step_size.exp()

    @torch.no_grad()
    def set_step_size(self, kind: str, rank: int, alpha: torch.Tensor | float) -> None:
        """Set alpha of `kind` ("weight" or "activation") at bit-width rank `rank` (stored as its log)."""
        value = torch.as_tensor(alpha, dtype=torch.float32).clamp_min(1e-12).log()
        self.log_step_size[STEP_SIZE_KINDS.index(kind), rank] = value

    @torch.no_grad()
    def reset_weight_step_sizes(self) -> None:
        """Init from the current weights (the least-squares fit of quantizer.fitted_step_size) for every
        weight bit-width."""
        if self.weight.is_meta:  # built on the meta device (shapes only): there is no data to start from
            return
        q = self.quantizer
        for i, b in enumerate(self.bit_widths.weights):
            self.set_step_size("weight", i, fitted_step_size(self.weight, b, symmetric=q.symmetric,
                                                             rounding=q.rounding))

    @torch.no_grad()
    def _initialise_activation_step(self, x: torch.Tensor) -> None:
        i, bits = self._bit_index, self.bits
        if self.quantizer.nesting == "clip":  # Eq. 3-4 use the largest bit-width's alpha only
            i, bits = len(self.bit_widths) - 1, self.bit_widths.max_bits
        if self._calibrating or not bool(self.activation_step_initialized[i]):
            q = self.quantizer
            alpha = fitted_step_size(x, bits, signed=self.signed_input, symmetric=q.symmetric, rounding=q.rounding)
            self.set_step_size("activation", i, alpha.clamp_min(1e-8))
            if self.quantizer.nesting == "clip":
                self.activation_step_initialized.fill_(True)  # the other entries are never used
            else:
                self.activation_step_initialized[i] = True
        self._activation_steps_ready = bool(self.activation_step_initialized.all())

    # -- quantization ----------------------------------------------------------------------------
    def _quantize(self, x: torch.Tensor, row: int, bit_set: tuple[int, ...], numel: int,
                  signed: bool = True) -> torch.Tensor:
        q = self.quantizer
        bits = bit_set[self._bit_index]
        if q.nesting == "clip":  # Eq. 3-4: the largest bit-width's alpha, shared by every bit-width
            return quantize_nested(x, self.log_step_size[row, -1].exp(), bits, bit_set[-1], rounding=q.rounding,
                                   symmetric=q.symmetric, signed=signed, gradient_numel=numel)
        return quantize_log_step(x, self.log_step_size, (row, self._bit_index), bits, rounding=q.rounding,
                                 symmetric=q.symmetric, signed=signed, gradient_numel=numel)

    def rectifies_input(self) -> bool:
        """Whether this layer's forward and backward treat every negative input exactly as 0, so that a ReLU
        just before it changes nothing and may be skipped: its activations are quantized into the unsigned
        range [0, 2**b - 1] with one step size per bit-width (Eq. 2's fused quantizer, where x <= 0 gives
        the state 0 and, the edge counting as outside, a zero gradient for x and the step size's clip-bound
        term 0 * g), and no step size is about to be initialised from this input (that reads the input's
        values, so it must see them rectified)."""
        if self.reference_path or not self.quantize_activations or self.signed_input:
            return False
        if self.quantizer.nesting != "scale" or self._calibrating:
            return False
        return self._activation_steps_ready or not self.training

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_activations:
            return x
        if self._calibrating or (self.training and not self._activation_steps_ready):
            self._initialise_activation_step(x)  # LSQ init from the first batch seen in training
        # LSQ's N for activations: features per sample.
        return self._quantize(x, ACTIVATION_ROW, self.bit_widths.activations, x.numel() // len(x),
                              signed=self.signed_input)

    def quantized_weight(self) -> torch.Tensor:
        if not self.quantize_weights:
            return self.weight  # Stage I: real-valued weights
        return self._quantize(self.weight, WEIGHT_ROW, self.bit_widths.weights, self.weight.numel())

    def quantization_repr(self) -> str:
        kind = "switchable" if self.switchable else "fixed"
        inputs = "" if self.signed_input else ", unsigned input"
        return f"bits={self.bit_widths.activations}/w{self.bit_widths.weights} ({kind}{inputs}), now={self.bits}"


def _forget_ready_cache(module, incompatible_keys) -> None:
    module._activation_steps_ready = False


def _stack_step_sizes(module, state_dict, prefix, *args) -> None:
    """Load a checkpoint written with two step-size parameters (`log_weight_step_size`,
    `log_activation_step_size`): stack them as the rows of `log_step_size`."""
    keys = [f"{prefix}log_{kind}_step_size" for kind in STEP_SIZE_KINDS]
    if all(key in state_dict for key in keys):
        state_dict[f"{prefix}log_step_size"] = torch.stack([state_dict.pop(key) for key in keys])


class QConv2d(QuantizedLayerMixin, nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, *, bits=BitWidths(), quantizer=None, switchable: bool = True, signed_input: bool = True):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self._init_quantization(bits, quantizer, switchable, signed_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.quantization_repr()


class QLinear(QuantizedLayerMixin, nn.Linear):
    def __init__(self, in_features, out_features, bias=True, *, bits=BitWidths(), quantizer=None,
                 switchable: bool = True, signed_input: bool = True):
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_quantization(bits, quantizer, switchable, signed_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.quantization_repr()


def set_reference_path(model: nn.Module, reference: bool = True) -> None:
    """Run `model` on the reference path (True: every ReLU kept) or the fast path (False, the default: a ReLU
    that the next layer's quantizer makes redundant is skipped). Both give the same outputs and gradients,
    bit for bit."""
    for m in model.modules():
        if isinstance(m, QuantizedLayerMixin):
            m.reference_path = bool(reference)


def step_size_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every learned (log) step size of the model: training gives them no weight decay, which would pull
    log alpha towards 0, i.e. alpha towards 1."""
    return [m.log_step_size for m in model.modules() if isinstance(m, QuantizedLayerMixin)]
