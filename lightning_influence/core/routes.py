"""Which way of differentiating works for a model: ``torch.func`` first, plain autograd after.

``torch.func`` (``vmap``, ``grad``, ``jvp``, ``jacrev``) is the fast path, but some layers refuse
it: ``nn.LSTM`` on CPU and ``nn.EmbeddingBag`` have no forward-mode derivative, and an
``autograd.Function`` written the classic way (no ``setup_context``) works under no transform at
all. Each stage that meets such a refusal switches, for the rest of the computation, to a route
of plain autograd that gives the same numbers, says so once, and records it (see
:attr:`Routes.diagnostics`, which ends up in ``result.diagnostics``).
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["ROUTES", "Routes", "refused"]

# What each stage does instead, in words, by (stage, route).
ROUTES: dict[tuple[str, str], str] = {
    ("per_sample_gradients", "loop"): (
        "a slower loop over examples for per-sample gradients, one backward pass each (a model "
        "without .item() calls, in-place ops on inputs or classic autograd.Functions runs "
        "vectorized)"
    ),
    ("curvature_products", "double_backward"): (
        "plain autograd for curvature products: Jacobian-vector products as the derivative of "
        "a vector-Jacobian product (Gauss-Newton), Hessian products as the derivative of the "
        "gradient"
    ),
    ("curvature_products", "reverse_passes"): (
        "per-example Jacobians from reverse passes for curvature products (Gauss-Newton only)"
    ),
    ("perturbation_maps", "double_backward"): (
        "plain autograd for perturbation maps, one pair of a training example and a validation "
        "point at a time"
    ),
    ("jacobians", "reverse_passes"): (
        "plain autograd for per-example Jacobians, one reverse pass per example and output"
    ),
}

# Fragments of the messages with which torch refuses a derivative (not a fault of the data).
_REFUSALS = (
    "forward AD",
    "setup_context",
    "functorch",
    "vmap",
    "Batching rule",
    "derivative for",
    "does not require grad",
    "not implemented",
    "does not support",
)


def refused(err: BaseException) -> bool:
    """Whether ``err`` is torch refusing a derivative (no forward-mode or double-backward formula,
    a classic ``autograd.Function`` under ``torch.func``, no batching rule), so that another
    route can give the same numbers; never for running out of memory.

    Example:
        >>> refused(NotImplementedError("Trying to use forward AD with _embedding_bag"))
        True
        >>> refused(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        False
    """
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return False
    if isinstance(err, NotImplementedError):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _REFUSALS)


class Routes:
    """The route each stage of one computation takes where ``torch.func`` refused.

    Example:
        >>> import warnings
        >>> routes = Routes()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     routes.fall_back("jacobians", "reverse_passes", NotImplementedError("no jvp"))
        ...     routes.fall_back("jacobians", "reverse_passes", NotImplementedError("no jvp"))
        >>> len(caught), routes.get("jacobians"), routes.diagnostics
        (1, 'reverse_passes', {'fallback_jacobians_reverse_passes': 1.0})
    """

    def __init__(self) -> None:
        self._taken: dict[str, str] = {}

    def get(self, stage: str) -> str | None:
        """The route ``stage`` has switched to, or ``None`` while ``torch.func`` serves it."""
        return self._taken.get(stage)

    def fall_back(self, stage: str, route: str, err: BaseException) -> None:
        """Switch ``stage`` to ``route`` for the rest of the computation; warn once."""
        if self._taken.get(stage) == route:
            return
        self._taken[stage] = route
        cause = str(err).splitlines()[0][:200] if str(err) else ""
        warnings.warn(
            f"torch.func cannot handle this model here ({type(err).__name__}: {cause}); "
            f"falling back to {ROUTES[(stage, route)]}. The numbers are the same, only slower; "
            f"`result.diagnostics` records it as 'fallback_{stage}_{route}'.",
            stacklevel=3,
        )

    @property
    def diagnostics(self) -> dict[str, float]:
        """``{"fallback_<stage>_<route>": 1.0}`` for each stage that left ``torch.func``."""
        return {f"fallback_{stage}_{route}": 1.0 for stage, route in self._taken.items()}
