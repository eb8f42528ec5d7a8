import pytest
import torch

from .digits import train_tiny


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """The deploy tests run tiny models: with 2 intra-op threads on a busy 2-core machine they were measured
    up to 60x slower (threads spin-waiting on each other), so these tests use one thread and restore it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="package")
def trained_tiny(one_torch_thread):
    """resnet_tiny after 3 epochs of mixed-precision training on the digits, and its validation batches."""
    return train_tiny(epochs=3)
