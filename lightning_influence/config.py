"""``InfluenceConfig``: every computation option, declared and checked once.

:func:`~lightning_influence.compute_influence`, :func:`~lightning_influence.influence_on_parameters`
and :class:`~lightning_influence.InfluenceCallback` all take one. It is a frozen dataclass, checked
in ``__post_init__`` (a bad value raises at once, naming the argument, the value and what is
allowed) and saved with the result through :meth:`InfluenceConfig.to_dict`. What the loggers show
lives beside it, in :class:`~lightning_influence.report.LogSettings`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lightning_influence.core.curvature import CurvatureChoice
from lightning_influence.core.precision import SCORING_DTYPES, ScoringDTypeName
from lightning_influence.core.task import ClassificationTask, Task
from lightning_influence.solvers import CG, Exact, FactorizedSolver, LiSSA, Solver

__all__ = ["DTypeName", "InfluenceConfig", "SolverName", "check_int"]

SolverName = Literal["lissa", "cg", "exact"]
DTypeName = Literal["float32", "float64"]
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_CURVATURES = get_args(CurvatureChoice)


@dataclass(frozen=True)
class InfluenceConfig:
    """How influence is computed: the solver, the curvature, what is scored.

    Args:
        solver: ``"lissa"``, ``"cg"``, ``"exact"`` or a configured :class:`Solver`. A name is
            turned into a solver by :meth:`make_solver`, the one place that does it: ``"lissa"``
            becomes ``LiSSA(seed=seed)``; a ``LiSSA`` instance keeps its own ``seed``.
        damping: the ``lambda`` of ``H + lambda I``; the weight decay the model was trained with
            reproduces its objective's curvature.
        task: how a batch becomes per-sample losses. ``None`` picks it from the data:
            ``ClassificationTask()`` for integer labels, ``RegressionTask()`` for one float
            target per example; other float targets need ``task=`` (the callback also checks it
            against ``training_step``'s loss).
        parameters: shell-style patterns of parameter names to use (all trainable by default).
        curvature: ``"gauss_newton"`` (positive semi-definite), ``"hessian"``, or ``"auto"``:
            the Hessian where ``H + damping I`` is measured positive definite (at an optimum:
            it follows leave-one-out retraining more closely), Gauss-Newton otherwise; the
            result's ``settings["curvature_used"]`` and ``diagnostics`` say which and why.
        self_influence: also compute self-influence (suspected mislabels, outliers).
        self_influence_solver: a factorizing solver for self-influence (by default the solver's
            own factorization where it has one, else ``LiSSA()``'s preconditioner, or
            ``Exact()`` for at most 512 parameters).
        num_val: validation points scored, drawn with ``seed`` (all of them when the set has no
            more than this, or when ``None``).
        val_indices: explicit validation dataset indices; overrides ``num_val``.
        perturbation_k: per validation point, input-space influence maps of its top-k helpful and
            harmful training examples (0 turns them off).
        token_k: for a language-model task, the share of each token's loss in the scores of
            every validation point's top-k helpful and harmful training sequences, raw and
            relative rankings (0 turns them off).
        batch_size: examples per batch of per-sample gradients (the loader's by default).
        curvature_batch_size: examples per batch of full-data curvature products (``CG``,
            ``Exact``, the sketch and LiSSA's residuals), independent of ``batch_size``: larger
            batches make these passes faster, at the cost of memory.
        dtype: working precision, ``"float32"`` or ``"float64"`` (for reference runs); the
            model's own by default. A ``torch.dtype`` is accepted and stored by name.
        scoring_dtype: ``"bfloat16"`` or ``"float16"`` runs the training examples' scoring pass
            (forward, backward and dot products) under autocast in that dtype, with scores,
            self-influence and solved vectors in float32; ``None`` (default) scores in ``dtype``.
            Needs a float32 working precision; CPU and CUDA both run it.
        seed: seeds the choice of validation points and a solver given by name.

    Example:
        >>> config = InfluenceConfig(solver="cg", damping=1e-2, num_val=16)
        >>> config.make_solver().name, config.to_dict()["damping"]
        ('cg', 0.01)
        >>> InfluenceConfig(damping=float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: `damping` must be a finite number >= 0, got nan.
    """

    solver: SolverName | Solver = "lissa"
    damping: float = 1e-3
    task: Task | None = None
    parameters: list[str] | None = None
    curvature: CurvatureChoice = "gauss_newton"
    self_influence: bool = True
    self_influence_solver: FactorizedSolver | None = None
    num_val: int | None = 64
    val_indices: list[int] | None = None
    perturbation_k: int = 4
    token_k: int = 8
    batch_size: int | None = None
    curvature_batch_size: int = 1024
    dtype: DTypeName | None = None
    scoring_dtype: ScoringDTypeName | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.solver, Solver) or self.solver in get_args(SolverName)):
            raise ValueError(
                "`solver` must be 'lissa', 'cg', 'exact' or a Solver instance, "
                f"got {self.solver!r}."
            )
        damping = self.damping
        if isinstance(damping, bool) or not isinstance(damping, int | float):
            raise ValueError(f"`damping` must be a finite number >= 0, got {damping!r}.")
        if not (math.isfinite(damping) and damping >= 0):
            raise ValueError(f"`damping` must be a finite number >= 0, got {damping!r}.")
        if damping == 0 and isinstance(self.make_solver(), LiSSA):
            raise ValueError(
                "`damping` must be > 0 with the LiSSA solver, got 0: its recursion converges at "
                "a rate set by `damping`. Pass the weight decay the model was trained with (or a "
                "small positive value such as 1e-3), or use solver='cg' or 'exact'."
            )
        if self.task is not None and not isinstance(self.task, Task):
            raise ValueError(f"`task` must be a lightning_influence.Task, got {self.task!r}.")
        if isinstance(self.parameters, str):
            object.__setattr__(self, "parameters", [self.parameters])
        _check_choice("curvature", self.curvature, _CURVATURES)
        if self.self_influence_solver is not None and not isinstance(
            self.self_influence_solver, FactorizedSolver
        ):
            raise ValueError(
                "`self_influence_solver` must be a factorizing solver such as Exact() or "
                f"LowRank(), or None, got {self.self_influence_solver!r}."
            )
        check_int("num_val", self.num_val, 1, allow_none=True)
        check_int("perturbation_k", self.perturbation_k, 0)
        check_int("token_k", self.token_k, 0)
        check_int("batch_size", self.batch_size, 1, allow_none=True)
        check_int("curvature_batch_size", self.curvature_batch_size, 1)
        check_int("seed", self.seed, 0)
        if isinstance(self.dtype, torch.dtype):
            names = {v: k for k, v in _DTYPES.items()}
            object.__setattr__(self, "dtype", names.get(self.dtype, str(self.dtype)))
        _check_choice("dtype", self.dtype, (None, *_DTYPES))
        if isinstance(self.scoring_dtype, torch.dtype):
            names = {v: k for k, v in SCORING_DTYPES.items()}
            object.__setattr__(
                self, "scoring_dtype", names.get(self.scoring_dtype, self.scoring_dtype)
            )
        if self.scoring_dtype not in (None, *SCORING_DTYPES):
            raise ValueError(
                "`scoring_dtype` must be None, 'bfloat16' or 'float16', got "
                f"{self.scoring_dtype!r}. None (the default) scores in the working precision "
                "`dtype`; 'bfloat16' lowers the scoring pass where the hardware has it."
            )
        if self.scoring_dtype is not None and self.dtype == "float64":
            raise ValueError(
                f"`scoring_dtype={self.scoring_dtype!r}` lowers a float32 scoring pass, but "
                "dtype='float64' asks for a reference run. Pass scoring_dtype=None with float64, "
                "or dtype=None / 'float32'."
            )
        if self.val_indices is not None:
            object.__setattr__(self, "val_indices", _index_list(self.val_indices))

    def make_solver(self) -> Solver:
        """The solver: ``solver`` itself, or the one its name stands for (``seed`` goes to LiSSA).

        Example:
            >>> InfluenceConfig(solver="lissa", seed=3).make_solver().seed
            3
        """
        if isinstance(self.solver, Solver):
            return self.solver
        if self.solver == "cg":
            return CG()
        if self.solver == "exact":
            return Exact()
        return LiSSA(seed=self.seed)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """``dtype`` as a ``torch.dtype`` (``None``: the model's own)."""
        return _DTYPES[self.dtype] if self.dtype else None

    @property
    def scoring_torch_dtype(self) -> torch.dtype | None:
        """``scoring_dtype`` as a ``torch.dtype`` (``None``: the working precision)."""
        return SCORING_DTYPES[self.scoring_dtype] if self.scoring_dtype else None

    def make_task(self) -> Task:
        """``task``, or ``ClassificationTask()`` when none was given."""
        return self.task if self.task is not None else ClassificationTask()

    def choose_val(self, n: int) -> Tensor:
        """Dataset indices of the validation points to score, out of a set of ``n``.

        ``val_indices`` when given (checked against ``n``), else ``num_val`` of them drawn with
        ``seed`` and sorted, else all.

        Example:
            >>> InfluenceConfig(num_val=3, seed=0).choose_val(10).tolist()
            [1, 4, 7]
        """
        if n == 0:
            raise ValueError("The validation dataset is empty: influence needs validation points.")
        if self.val_indices is not None:
            idx = torch.tensor(self.val_indices, dtype=torch.long)
            if int(idx.max()) >= n:
                raise IndexError(
                    f"`val_indices` contains {int(idx.max())}, out of range for a validation set "
                    f"of {n} examples (valid: 0..{n - 1})."
                )
            return idx
        if self.num_val is None or n <= self.num_val:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=generator)[: self.num_val].sort().values

    def to_dict(self) -> dict[str, Any]:
        """The settings, JSON-serialisable (solvers by their settings, the task by its name).

        Example:
            >>> InfluenceConfig(solver="cg").to_dict()["solver"]
            {'name': 'cg', 'max_iter': 100, 'tol': 1e-06}
        """
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["solver"] = self.make_solver().settings()
        out["task"] = type(self.make_task()).__name__
        si = self.self_influence_solver
        out["self_influence_solver"] = si.settings() if si is not None else None
        out["damping"] = float(self.damping)
        return out


def _index_list(values: Any) -> list[int]:
    items = values.tolist() if isinstance(values, Tensor) else list(values)
    if not items or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise ValueError(
            "`val_indices` must be a non-empty list of dataset indices >= 0, got "
            f"{values!r} (with none, the validation data is empty)."
        )
    return [int(i) for i in items]


def check_int(name: str, value: Any, low: int, allow_none: bool = False) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an integer ``>= low``."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be an integer >= {low}{extra}, got {value!r}.")


def _check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")
