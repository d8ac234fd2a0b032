"""Shared test settings."""

import torch

# The tensors in tests are small: intra-op threads cost more than they give, and on a shared
# 2-core machine they oversubscribe the cores (a measured 60 s -> 8 s for one test file).
torch.set_num_threads(1)

import pytest  # noqa: E402

#: The devices the device-parametrized tests run on: the CPU, and CUDA where present.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available device in turn (``cuda`` only where ``torch.cuda.is_available()``)."""
    return torch.device(request.param)
