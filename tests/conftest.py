"""Shared test settings."""

import torch

# The tensors in tests are small: intra-op threads cost more than they give, and on a shared
# 2-core machine they oversubscribe the cores (a measured 60 s -> 8 s for one test file).
torch.set_num_threads(1)
