"""PyTorch's built-in attention, made differentiable in every mode that influence needs.

In evaluation mode ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` take a fused fast
path (``aten::_transformer_encoder_layer_fwd``, ``aten::_native_multi_head_attention``) that has no
forward-mode derivative, so curvature products fail; and the fused CPU flash-attention kernel of
``scaled_dot_product_attention`` has no ``vmap`` rule, so per-sample gradients fall back to a slow
loop. :func:`differentiable_attention` switches both off for the duration of a computation (same
numbers, plain differentiable operations) and restores the previous settings afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["differentiable_attention"]


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """Attention through plain differentiable operations inside the block.

    Example:
        >>> import torch
        >>> with differentiable_attention():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
        >>> torch.backends.mha.get_fastpath_enabled()
        True
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
