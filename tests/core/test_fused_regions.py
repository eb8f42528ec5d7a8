"""The compiled regions (fused_regions.compile_fused_regions) against the eager path, the reference.

Inductor orders float operations its own way (a BN's batch statistics above all: sums over the n = N*H*W
values of a channel in another order), so the two paths agree to rounding, not bit for bit. The bounds used:
- Quantized levels: every region's output is checked level by level against the eager quantizer applied to
  the eagerly computed region input. A different level is allowed only where the eager pre-floor value v lies
  within n * eps * max(|v|, 1) of an integer (eps = float32's 2**-23; n * eps bounds the relative error of a
  sum of n terms in any order), i.e. where floor() may flip under reordering. A draw with such a flip sends a
  different activation downstream, so its outputs and gradients are not compared (both networks restart from
  the same state at every draw).
- Outputs, gradients (input, weights, BN affine) and running statistics: within 1e-3 of the largest magnitude
  of the same tensor (a few layers of n * eps ~ 3e-5 each, n = 256 here). The step sizes' gradients are a
  difference of two sums that cancel (g . q - (g [inside]) . x): within 2e-2 of the largest, the same rounding
  against a cancellation of up to ~20x seen in this network.
Needs a C++ compiler (inductor's CPU backend); the first run builds ~9 small graphs.
"""

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from bitmixer_core import (StagePolicy, apply_assignment, build_model, calibrate_activation_step_sizes,
                           compile_fused_regions, quantized_layers, residual_blocks)
from bitmixer_core import fused_regions
from bitmixer_core.models import ResNet, ResNetSpec

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None,
                                reason="torch.compile's CPU backend needs a C++ compiler (g++ or gcc)")

EPS = torch.finfo(torch.float32).eps
# Two stages of one basic block each: an identity shortcut, a downsampling one (conv + BN), a block end whose
# output two convs quantize, the stem region and the last block's region without a quantizer.
SPEC = ResNetSpec("basic", (1, 1), (8, 16), stem_width=8)


def _close(actual, expected, rel):
    return (actual - expected).abs().max() <= rel * expected.abs().max().clamp_min(1e-30)


def _levels_checked(flips, ties):
    """Wrap the compiled region so that each call's levels are compared with the eager quantizer's."""
    compiled = fused_regions._region()

    def check(y, bn, shortcut, shortcut_bn, quantizers, keep_output):
        with torch.no_grad():  # the eager region input, from copies of the running statistics
            def batch_norm(t, p):
                return F.batch_norm(t, p[2].clone(), p[3].clone(), p[0], p[1], True, p[4], p[5])
            z = batch_norm(y, bn)
            if shortcut is not None:
                z = z + (shortcut if shortcut_bn is None else batch_norm(shortcut, shortcut_bn))
            r, n = z.relu(), y.numel() // y.shape[1]
        results = compiled(y, bn, shortcut, shortcut_bn, quantizers, keep_output)
        for (alpha, lo, hi, _), q in zip(quantizers, results[1:] if keep_output else results):
            with torch.no_grad():
                v = (r / alpha).clamp(lo, hi)
                differ = v.floor() != torch.round(q / alpha)
                if differ.any():
                    flips.append(int(differ.sum()))
                    ties.append(bool(((v - v.round()).abs() <= n * EPS * v.abs().clamp_min(1))[differ].all()))
        return results
    return check


def test_compiled_regions_agree_with_the_eager_path(monkeypatch):
    """Ten Stage III draws (layer-wise bits, a new sub-net each): the compiled network's quantized levels are the
    eager ones except at ties, its outputs and every gradient (input, weights, step sizes, BN affine) and the
    running statistics match the eager path's within the bounds above, and the ten draws compile once per
    region kind and shape: no draw after the first builds a graph."""
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    eager = ResNet(SPEC, num_classes=10, stem="small")
    calibrate_activation_step_sizes(eager, images)
    compiled = compile_fused_regions(copy.deepcopy(eager))
    flips, ties = [], []
    monkeypatch.setattr(fused_regions, "_region", lambda check=_levels_checked(flips, ties): check)
    policy = StagePolicy.stage_three((2, 3, 4), k=0.75, ramp_epochs=0)
    names, blocks = [n for n, _ in quantized_layers(eager)], residual_blocks(eager)
    generator = torch.Generator().manual_seed(0)
    graphs_after_first, compared = None, 0
    from torch._dynamo.utils import counters
    for draw in range(10):
        compiled.load_state_dict(eager.state_dict())
        assignment = policy.sample(names, blocks, epoch=100.0, generator=generator)
        results = []
        for model in (eager, compiled):
            apply_assignment(model, assignment)
            model.train()
            model.zero_grad(set_to_none=True)
            x = images.clone().requires_grad_(True)
            out = model(x)
            F.cross_entropy(out, labels).backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            results.append((out.detach(), x.grad, grads, copy.deepcopy(model.state_dict())))
        if draw == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
        assert all(ties), "a quantized level differs where the eager value is not at a floor() tie"
        if flips:
            flips.clear()
            continue
        compared += 1
        (out_e, x_e, grads_e, state_e), (out_c, x_c, grads_c, state_c) = results
        assert _close(out_c, out_e, 1e-3)
        assert _close(x_c, x_e, 1e-3)
        assert grads_c.keys() == grads_e.keys()
        for name, grad in grads_e.items():
            assert _close(grads_c[name], grad, 2e-2 if "step_size" in name else 1e-3), name
        for name, value in state_e.items():
            assert _close(state_c[name].double(), value.double(), 1e-3), name
    assert counters["stats"]["unique_graphs"] == graphs_after_first, "a new sub-net draw recompiled a region"
    assert compared >= 8


def test_eval_runs_the_eager_path_and_other_orders_are_refused():
    """Evaluation (and any forward without gradients) is the eager network's, bit for bit; a BN-first network
    is refused with a sentence saying what to do."""
    torch.manual_seed(0)
    images = torch.randn(4, 3, 8, 8)
    eager = ResNet(SPEC, num_classes=10, stem="small")
    calibrate_activation_step_sizes(eager, images)
    compiled = compile_fused_regions(copy.deepcopy(eager))
    for model in (eager, compiled):
        model.eval()
    with torch.no_grad():
        assert torch.equal(compiled(images), eager(images))
    assert not compile_fused_regions(compiled, enabled=False).compiled_regions
    with pytest.raises(ValueError, match="classic block order"):
        compile_fused_regions(build_model("resnet_tiny", num_classes=10, stem="small", block_order="bn_quantize_conv"))
