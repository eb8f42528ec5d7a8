import pytest

from .digits import train_tiny


@pytest.fixture(scope="session")
def trained_tiny():
    """resnet_tiny after 3 epochs of mixed-precision training on the digits, and its validation batches."""
    return train_tiny(epochs=3)
