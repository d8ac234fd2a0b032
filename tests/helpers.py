"""Helpers shared by several test files."""

from __future__ import annotations

from collections.abc import Callable

import torch


def saved_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """``(bytes, fn())``: the bytes of every tensor autograd saves for backward while ``fn``
    runs (its activations, custom Functions' ``save_for_backward`` included)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out
