"""Distillation loss against its formula; the evaluation protocol on a set with a known answer."""

import pytest
import torch
from torch import nn

from bitmixer_core import (distillation_loss, evaluate_fixed_bits, evaluate_random_bits, get_bits, set_bits)


def test_distillation_loss_matches_hand_formula():
    """CE + w T^2 sum_c p_t (log p_t - log p_s) / batch, with p = softmax(logits / T); no teacher: CE."""
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    T, w = 3.0, 0.7
    ce = -torch.log(torch.softmax(s, 1)[torch.arange(6), y]).mean()
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    kl = (pt * (pt.log() - ps.log())).sum() / 6
    got = distillation_loss(s, t, y, temperature=T, weight=w)
    torch.testing.assert_close(got, ce + w * T * T * kl)
    torch.testing.assert_close(distillation_loss(s, None, y, temperature=T, weight=w), ce)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, y, temperature=0.0, weight=1.0)


def make_set(model, n_batches=4, per_batch=10):
    torch.manual_seed(3)
    return [torch.randn(per_batch, 3, 32, 32) for _ in range(n_batches)]


def test_fixed_bits_accuracy_has_known_answer_and_model_is_restored(tiny):
    """Labels equal the model's own top-1 for half the examples and its lowest-ranked class for the rest:
    top-1 and top-5 must be exactly 50%; mode and bits are restored, counts pass through reduce."""
    model, _ = tiny
    images = make_set(model)
    set_bits(model, 3)
    model.train()
    with torch.no_grad():
        model.eval()
        batches = []
        for i, x in enumerate(images):
            logits = model(x)
            labels = logits.argmax(1) if i % 2 == 0 else logits.argmin(1)
            batches.append((x, labels))
        model.train()
    set_bits(model, 2)
    before = get_bits(model)
    result = evaluate_fixed_bits(model, batches, 3)
    assert result == {"top1": 50.0, "top5": 50.0, "n": 40}
    assert model.training and get_bits(model) == before
    doubled = evaluate_fixed_bits(model, batches, 3, reduce=lambda t: 2 * t)
    assert doubled["top1"] == 50.0 and doubled["n"] == 80


def test_random_bits_redraws_every_batch_and_reports_mean_std(tiny):
    """Rand.: each layer's bits are redrawn at every batch from a seeded generator; with a model whose
    prediction cannot depend on bits (huge FC bias on class 3) the answer is the share of class 3."""
    model, _ = tiny
    with torch.no_grad():
        model.fc.bias.fill_(0.0)
        model.fc.bias[3] = 1e6
    images = make_set(model)
    batches = [(x, torch.tensor([3, 3, 3, 0, 1, 2, 4, 5, 6, 7])) for x in images]
    seen = []
    hook = model.layer1[0].conv1.register_forward_pre_hook(lambda m, a: seen.append(tuple(get_bits(model).values())))
    result = evaluate_random_bits(model, batches, seeds=(0, 1))
    hook.remove()
    assert result["top1_mean"] == pytest.approx(30.0) and result["top1_std"] == 0.0
    assert result["n"] == 40 and result["seeds"] == [0, 1]
    assert len(seen) == 8 and len(set(seen)) > 1 and any(len(set(bits)) > 1 for bits in seen)
    again = []
    hook = model.layer1[0].conv1.register_forward_pre_hook(lambda m, a: again.append(tuple(get_bits(model).values())))
    evaluate_random_bits(model, batches, seeds=(0, 1))
    hook.remove()
    assert again == seen
    with pytest.raises(ValueError, match="no examples"):
        evaluate_random_bits(model, iter(batches), seeds=(0, 1))
