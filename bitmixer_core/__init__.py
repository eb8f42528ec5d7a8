"""Bit-Mixer (Bulat & Tzimiropoulos, ICCV 2021) in plain PyTorch: the public API of the method."""

from .assignment import (
    BitAssignment,
    apply_assignment,
    get_bits,
    quantized_layers,
    residual_blocks,
    set_bits,
    set_block_bits,
    set_quantization,
)
from .bitwidths import BitWidths
from .distillation import distillation_loss
from .evaluation import evaluate_fixed_bits, evaluate_random_bits
from .fused_regions import compile_fused_regions
from .layers import QConv2d, QLinear, QuantizedLayerMixin, set_reference_path, step_size_parameters
from .models import available_models, build_model
from .policies import StagePolicy
from .stages import STAGES, Stage, get_stage
from .quantizer import QuantizerOptions, initial_step_size, quantize, quantize_nested
from .step_sizes import calibrate_activation_step_sizes, reinitialize_weight_step_sizes
from .transitional_bn import TransitionalBatchNorm2d, load_across_bn_modes, seed_mixed_transitions

__all__ = [
    "quantize", "quantize_nested", "QuantizerOptions", "initial_step_size",
    "BitWidths",
    "QConv2d", "QLinear", "QuantizedLayerMixin", "step_size_parameters", "set_reference_path",
    "TransitionalBatchNorm2d", "seed_mixed_transitions", "load_across_bn_modes",
    "quantized_layers", "set_bits", "get_bits", "set_block_bits", "residual_blocks", "set_quantization",
    "BitAssignment", "apply_assignment",
    "StagePolicy", "Stage", "STAGES", "get_stage",
    "build_model", "available_models", "calibrate_activation_step_sizes", "reinitialize_weight_step_sizes",
    "distillation_loss", "evaluate_fixed_bits", "evaluate_random_bits",
    "compile_fused_regions",
]
