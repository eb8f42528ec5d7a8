"""Export -> load -> evaluate: the artifact runs every assignment exactly like the trained model."""
import torch

import bitmixer_core as core
from bitmixer_core.export import derived_weight_agreement, export_meta_network, load_meta_network

from .digits import BUILD_KWARGS, MODEL_NAME

MIXED = None  # a fixed mixed assignment, built from the layer count


def _logits(model, batches, bits):
    core.set_bits(model, bits)
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in batches])


def test_exported_model_matches_source_at_every_fixed_and_a_mixed_assignment(trained_tiny, tmp_path):
    """Top-1 (and the logits) of the loaded artifact equal the source's at 2, 3, 4 bits and a mixed sub-net."""
    model, val = trained_tiny
    report = export_meta_network(model, MODEL_NAME, BUILD_KWARGS, tmp_path / "tiny.bmx")
    loaded, header = load_meta_network(tmp_path / "tiny.bmx")
    assert header["model_name"] == MODEL_NAME and report.verbatim_weights == 0
    n = len(core.quantized_layers(model))
    mixed = [(2, 3, 4)[i % 3] for i in range(n)]
    for bits in (2, 3, 4, mixed):
        want = core.evaluate_fixed_bits(model, val, bits)["top1"]
        got = core.evaluate_fixed_bits(loaded, val, bits)["top1"]
        assert got == want, f"assignment {bits}: {got} != {want}"
        assert torch.allclose(_logits(loaded, val, bits), _logits(model, val, bits), atol=1e-4)


def test_derived_artifact_is_exact_at_n_bits_and_smaller(trained_tiny, tmp_path):
    """Lower bits derived from the n-bit integers only: n-bit top-1 unchanged; file smaller than exact."""
    model, val = trained_tiny
    exact = export_meta_network(model, MODEL_NAME, BUILD_KWARGS, tmp_path / "exact.bmx")
    derived = export_meta_network(model, MODEL_NAME, BUILD_KWARGS, tmp_path / "derived.bmx", lower_bits="derived")
    assert derived.artifact_bytes < exact.artifact_bytes
    loaded, _ = load_meta_network(tmp_path / "derived.bmx")
    assert core.evaluate_fixed_bits(loaded, val, 4)["top1"] == core.evaluate_fixed_bits(model, val, 4)["top1"]
    agreement = derived_weight_agreement(model)
    assert agreement[4] == 1.0 and all(0.0 < a <= 1.0 for a in agreement.values())
