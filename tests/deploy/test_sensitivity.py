"""Layer sensitivity (section 4.2): top Hessian eigenvalue by power iteration with Hessian-vector products."""
import pytest
import torch
import torch.nn.functional as F

from bitmixer_core import build_model, calibrate_activation_step_sizes, get_bits, set_bits
from bitmixer_core.sensitivity import PowerIterationOptions, layer_sensitivities, top_hessian_eigenvalues


def test_power_iteration_finds_the_known_top_eigenvalue_averaged_over_batches():
    """For loss_k = 0.5 x^T A_k x the result must be the top eigenvalue of mean(A_k), per parameter block."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    a1 = q @ torch.diag(torch.tensor([6.0, 2.0, 1.0, 0.5, 0.2, 0.1])) @ q.T
    a2 = q @ torch.diag(torch.tensor([2.0, 2.0, 1.0, 0.5, 0.2, 0.1])) @ q.T  # mean top eigenvalue: 4
    x = torch.randn(6, requires_grad=True)
    y = torch.randn(3, requires_grad=True)  # second block: Hessian diag(3, 1, 1) -> 3

    def loss(a):
        return 0.5 * x @ a @ x + 0.5 * (y * y * torch.tensor([3.0, 1.0, 1.0])).sum()

    values = top_hessian_eigenvalues(loss, [a1, a2], [x, y], PowerIterationOptions(max_iterations=200, tolerance=1e-8))
    assert values == pytest.approx([4.0, 3.0], rel=1e-4)


def test_bad_options_name_the_field():
    """A non-positive iteration cap or tolerance is refused with the field's name."""
    with pytest.raises(ValueError, match="max_iterations"):
        PowerIterationOptions(max_iterations=0)
    with pytest.raises(ValueError, match="tolerance"):
        PowerIterationOptions(tolerance=0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("resnet_tiny", num_classes=10, stem="small")
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    calibrate_activation_step_sizes(model, images)
    return model, [(images, labels)]


def test_layer_eigenvalue_matches_the_full_hessian_of_a_small_quantized_layer():
    """Through the core's quantizer (4 bits), power iteration equals eigvalsh of the explicit Hessian."""
    from torch import nn

    from bitmixer_core import QConv2d, QLinear

    torch.manual_seed(0)
    conv = QConv2d(3, 4, 3, padding=1, bits=(2, 3, 4))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), QLinear(4 * 6 * 6, 10, bits=(2, 3, 4)))
    images, labels = torch.randn(16, 3, 6, 6), torch.randint(0, 10, (16,))
    model.train()
    model(images)  # LSQ initialisation of the activation step sizes from this batch
    model.eval()
    original = conv.weight.detach().clone()

    def loss_of(w):
        out = torch.func.functional_call(model, {"0.weight": w.view_as(original)}, (images,))
        return F.cross_entropy(out, labels)

    hessian = torch.autograd.functional.hessian(loss_of, original.reshape(-1))
    eig = torch.linalg.eigvalsh((hessian + hessian.T) / 2)
    want = float(eig[eig.abs().argmax()])
    assert abs(want) > 1e-4  # the check below is not vacuous
    got = top_hessian_eigenvalues(lambda b: F.cross_entropy(model(b[0]), b[1]), [(images, labels)], [conv.weight],
                                  PowerIterationOptions(max_iterations=300, tolerance=1e-7))[0]
    assert got == pytest.approx(want, rel=1e-2)


def test_layer_sensitivities_measure_at_max_bits_and_restore_the_model(tiny):
    """One finite value per switchable layer; the caller's bit assignment and train mode are put back."""
    model, batches = tiny
    model.train()
    set_bits(model, 2)
    before = get_bits(model)
    values = layer_sensitivities(model, batches, PowerIterationOptions(max_iterations=3, seed=1))
    assert list(values) == list(before)
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values())
    assert get_bits(model) == before and model.training
    again = layer_sensitivities(model, batches, PowerIterationOptions(max_iterations=3, seed=1))
    assert again == values  # same seed, same result
