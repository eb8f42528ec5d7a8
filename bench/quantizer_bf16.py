"""How far the step-size gradient of the quantizer moves when it runs on bf16 activations (a GPU stage's
autocast: the BN output has 8 significant bits; x / alpha is one float32 division), against float64
arithmetic on the very same bf16 input and upstream gradient. Post-ReLU activations of 32 x 64 x 28 x 28, the
unsigned range, the fitted step size; the relative error of d loss / d log alpha over `--trials` draws per
bit-width.

    .venv/bin/python bench/quantizer_bf16.py [--trials 5] [--exact-dots]

--exact-dots computes the backward's two dot products in float64 too, to tell the forward's rounding of
x / alpha from the dot products' rounding.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bitmixer_core import quantizer  # noqa: E402


def step_size_gradient(x: torch.Tensor, g: torch.Tensor, log_alpha: float, bits: int) -> float:
    log_steps = torch.tensor([[0.0] * 3, [log_alpha] * 3], requires_grad=True)
    out = quantizer.quantize_log_step(x, log_steps, (1, 0), bits, signed=False, gradient_numel=x[0].numel())
    out.backward(g)
    return float(log_steps.grad[1, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--exact-dots", action="store_true")
    args = parser.parse_args()
    if args.exact_dots:
        dot = quantizer._dot
        quantizer._dot = lambda a, b: dot(a.double(), b.double())
    torch.manual_seed(0)
    for bits in (2, 3, 4):
        errors = []
        for _ in range(args.trials):
            x = torch.relu(torch.randn(32, 64, 28, 28)).bfloat16()
            g = (torch.randn(x.shape) * 1e-3).bfloat16()
            log_alpha = float(quantizer.fitted_step_size(x.float(), bits, signed=False).log())
            exact = step_size_gradient(x.double(), g.double(), log_alpha, bits)
            errors.append(abs(step_size_gradient(x, g, log_alpha, bits) - exact) / abs(exact))
        print(f"{bits} bits: relative error of the step-size gradient in bf16, median "
              f"{statistics.median(errors):.3f}, max {max(errors):.3f} ({args.trials} draws)")


if __name__ == "__main__":
    main()
