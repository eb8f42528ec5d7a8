"""A small real model for the deployment tests: resnet_tiny trained briefly on scikit-learn's digits.

Digits are 8x8 grey images (values 0-16); they are scaled to [0, 1], replicated to 3 channels and fed at
8x8 with the small stem. Training switches every layer to one random bit-width per step (Stage II style)
and, with probability 1/2, draws each layer's bits independently (Stage III style), so every bit-width
and mixed assignments are meaningful afterwards.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import bitmixer_core as core

MODEL_NAME = "resnet_tiny"
BUILD_KWARGS = {"num_classes": 10, "stem": "small", "bits": [2, 3, 4]}


def digits_tensors(seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    split = int(0.8 * len(labels))
    train, val = order[:split], order[split:]
    return (images[train], labels[train]), (images[val], labels[val])


def batches(images, labels, batch_size: int):
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(labels), batch_size)]


def train_tiny(epochs: int = 3, seed: int = 0, batch_size: int = 64, lr: float = 1e-2):
    """(model, val batches) after `epochs` of mixed-precision training."""
    torch.manual_seed(seed)
    (x, y), (vx, vy) = digits_tensors(seed)
    model = core.build_model(MODEL_NAME, **BUILD_KWARGS)
    core.calibrate_activation_step_sizes(model, x[:256])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    layers = core.quantized_layers(model)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            if torch.rand((), generator=generator) < 0.5:
                core.set_bits(model, int((2, 3, 4)[torch.randint(3, (), generator=generator)]))
            else:
                core.set_bits(model, [int((2, 3, 4)[j]) for j in torch.randint(3, (len(layers),), generator=generator)])
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model, batches(vx, vy, 128)
