"""``compute_influence``: the whole pipeline in one call, without a Trainer.

dataloaders -> per-sample gradients -> validation inverse-HVPs -> scores -> InfluenceResult.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_influence.choices import choose_curvature, default_self_influence_solver
from lightning_influence.config import InfluenceConfig
from lightning_influence.core.data import IndexedData, as_indexed
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.precision import check_scoring_dtype
from lightning_influence.core.scores import example_pass, pairs_per_chunk, perturbation_pairs
from lightning_influence.core.tokens import has_token_losses, token_shares_shown
from lightning_influence.guards import (
    bad_examples_named,
    check_examples_everywhere,
    check_memory,
    check_weights,
    default_task,
    float_inputs,
    raise_non_finite,
    working_dtype,
)
from lightning_influence.result import InfluenceResult, relative_denominators
from lightning_influence.solvers import FactorizedSolver, InverseOperator, LiSSA
from lightning_influence.solvers.base import check_finite

__all__ = [
    "compute_influence",
    "evaluation_mode",
    "influence_on_parameters",
]

Data = Dataset[Any] | DataLoader[Any] | IndexedData


@contextmanager
def evaluation_mode(model: nn.Module, device: torch.device | None = None) -> Iterator[None]:
    """Evaluation mode (BatchNorm running statistics, no dropout), gradients on, on ``device``.

    Each submodule's train/eval mode, each parameter's ``requires_grad`` and every tensor's
    device are restored afterwards, whatever happens.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
        >>> with evaluation_mode(model):
        ...     model[1].training
        False
        >>> model[1].training
        True
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    places = [(t, t.device) for t in (*model.parameters(), *model.buffers())]
    try:
        if device is not None:
            model.to(device)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        devices = {dev for _, dev in places}
        if len(devices) == 1:
            model.to(devices.pop())
        else:
            for tensor, dev in places:
                tensor.data = tensor.data.to(dev)
        for module, training in modes:
            module.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


# Called with keywords only, `compute_influence` scores every validation example and draws no
# perturbation maps or token shares unless asked; an `InfluenceConfig` passed as `config` keeps
# its own values.
FUNCTION_DEFAULTS: dict[str, Any] = {"num_val": None, "perturbation_k": 0, "token_k": 0}


def compute_influence(
    model: nn.Module,
    train_data: Data,
    val_data: Data,
    config: InfluenceConfig | None = None,
    *,
    train_indices: Sequence[int] | Tensor | None = None,
    progress: bool = True,
    reduce: Callable[[Tensor], Tensor] | None = None,
    **options: Any,
) -> InfluenceResult:
    """Influence of every training example on each validation example.

    Args:
        model: the trained model, on the device to compute on; it is not modified.
        train_data: training ``Dataset`` or ``DataLoader`` (its dataset and collate function are
            used; never its sampler, so scores carry dataset indices).
        val_data: validation ``Dataset`` or ``DataLoader``.
        config: the settings (solver, damping, task, parameters, curvature, self-influence,
            validation points, perturbation maps, batch size, precision, seed); see
            :class:`~lightning_influence.InfluenceConfig`.
        train_indices: dataset indices of the training examples to score (all by default). The
            curvature is always that of these examples (summed over processes with ``reduce``).
        progress: show progress bars.
        reduce: sums a tensor across processes under data parallelism (each process passes its
            own shard as ``train_indices``); ``None`` on one process.
        **options: :class:`~lightning_influence.InfluenceConfig` fields, replacing those of
            ``config``. Without ``config`` they build one in which ``num_val=None`` (every
            validation example), ``perturbation_k=0`` and ``token_k=0`` unless given, e.g.
            ``compute_influence(model, train, val, solver=Exact(), damping=0.1)``.

    Returns:
        An :class:`InfluenceResult`; ``scores[i, j]`` is positive when training example ``i``
        harms validation example ``j``.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence import Exact
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
        >>> model = torch.nn.Linear(3, 2)
        >>> result = compute_influence(model, TensorDataset(x[:30], y[:30]),
        ...                            TensorDataset(x[30:], y[30:]), damping=0.1,
        ...                            solver=Exact(), progress=False)
        >>> result.scores.shape, result.self_influence.shape
        (torch.Size([30, 10]), torch.Size([30]))
    """
    config = _config(config, options)
    with evaluation_mode(model):
        return _compute(model, train_data, val_data, config, train_indices, progress, reduce)


def _config(config: InfluenceConfig | None, options: dict[str, Any]) -> InfluenceConfig:
    if config is None:
        return InfluenceConfig(**{**FUNCTION_DEFAULTS, **options})
    return replace(config, **options) if options else config


def _compute(
    model: nn.Module,
    train_data: Data,
    val_data: Data,
    config: InfluenceConfig,
    train_indices: Sequence[int] | Tensor | None,
    progress: bool,
    reduce: Callable[[Tensor], Tensor] | None,
) -> InfluenceResult:
    started = time.perf_counter()
    solver, damping = config.make_solver(), config.damping
    train = as_indexed(train_data, train_indices, config.batch_size)
    val = as_indexed(val_data, config.val_indices, config.batch_size)
    if len(val) == 0:
        raise ValueError("The validation data is empty: pass a non-empty `val_data`.")
    if config.val_indices is None:  # `num_val` of them, drawn with `seed`
        val = val.subset(val.indices[config.choose_val(len(val))])
    dtype = working_dtype(model, config.torch_dtype)
    task = config.task or default_task(model, train, config.parameters, dtype)
    fm = FunctionalModel(model, task, config.parameters, dtype)
    self_influence = config.self_influence
    si_solver = config.self_influence_solver or default_self_influence_solver(fm.n_params, solver)
    check_weights(fm)
    check_scoring_dtype(fm.dtype, fm.device, config.scoring_torch_dtype)
    check_memory(fm, len(val), train.batch_size, [solver, si_solver][: 1 + self_influence])
    if reduce is not None:
        check_examples_everywhere(fm, train, reduce)
    # Full passes over the curvature data (CG, Exact, LowRank) run faster in larger batches.
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    curv, choice_info = choose_curvature(
        fm, train.rebatched(config.curvature_batch_size), config.curvature, damping, reduce,
        config.seed,
    )  # fmt: skip
    if choice_info:
        timings["time_curvature_choice"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with bad_examples_named(fm, val, "validation"):
        val_pass = example_pass(fm, val, keep_gradients=True, progress=progress, desc="Validation")
    assert val_pass.gradients is not None
    bad_val = val_pass.indices[~torch.isfinite(val_pass.gradients).all(dim=1).cpu()]
    if bad_val.numel():
        raise_non_finite("validation", bad_val)
    timings["time_val_gradients"] = time.perf_counter() - t0

    inverse: InverseOperator | None = None
    self_info: dict[str, float] = {}
    t0 = time.perf_counter()
    with bad_examples_named(fm, train, "training"):  # a NaN example, not `damping`, is named
        if isinstance(solver, FactorizedSolver):
            factorized, solver_info = solver.factorize(curv, damping, progress)
            val_inverse = factorized(val_pass.gradients)
            if self_influence and si_solver == solver:  # one factorization serves both
                inverse, self_info = factorized, solver_info
        elif isinstance(solver, LiSSA) and self_influence and si_solver == solver.preconditioner:
            shared = si_solver.factorize(curv, damping, progress)  # one factorization serves both
            val_inverse, solver_info = solver.solve(
                curv, val_pass.gradients, damping, progress, factorization=shared
            )
            inverse, self_info = shared
        else:
            val_inverse, solver_info = solver.solve(curv, val_pass.gradients, damping, progress)
        check_finite(val_inverse, solver.name, damping, None)
    timings["time_solver"] = time.perf_counter() - t0

    if self_influence and inverse is None:
        t0 = time.perf_counter()
        with bad_examples_named(fm, train, "training"):
            inverse, self_info = si_solver.factorize(curv, damping, progress)
        timings["time_self_influence_factorize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with bad_examples_named(fm, train, "training"):
        train_pass = example_pass(
            fm,
            train,
            val_inverse,
            inverse,
            progress=progress,
            desc="Training",
            scoring_dtype=config.scoring_torch_dtype,
        )
    timings["time_scoring"] = time.perf_counter() - t0

    perturbation = perturbation_indices = None
    maps = config.perturbation_k > 0 and train_pass.scores is not None
    if maps and not float_inputs(fm, train):
        warnings.warn(
            "perturbation_k > 0, but the inputs are not floating-point tensors (token ids?): "
            "perturbation maps need a gradient in the inputs and are skipped. Pass "
            "perturbation_k=0 to silence this.",
            stacklevel=3,
        )
        maps = False
    if maps and train_pass.scores is not None:
        t0 = time.perf_counter()
        perturbation, perturbation_indices = _perturbations(
            fm, train, train_pass.indices, train_pass.scores, val_inverse, config.perturbation_k
        )
        timings["time_perturbation"] = time.perf_counter() - t0
    token_shares = token_share_indices = None
    if config.token_k > 0 and train_pass.scores is not None and has_token_losses(fm):
        t0 = time.perf_counter()
        si = train_pass.self_influence
        token_shares, token_share_indices = token_shares_shown(
            fm,
            train,
            train_pass.indices,
            train_pass.scores,
            val_inverse,
            config.token_k,
            None if si is None else relative_denominators(si),
        )
        timings["time_token_shares"] = time.perf_counter() - t0
    timings["time_total"] = time.perf_counter() - started

    diagnostics = {
        **choice_info,
        **{f"solver_{k}": v for k, v in solver_info.items()},
        **{f"self_influence_{k}": v for k, v in self_info.items()},
        **timings,
        **fm.routes.diagnostics,  # stages that left torch.func for plain autograd
    }
    settings = {
        "solver": solver.settings(),
        "self_influence_solver": si_solver.settings() if self_influence else None,
        "curvature": config.curvature,
        "curvature_used": curv.kind,
        "parameters": fm.names,
        "n_params": fm.n_params,
        "n_train_total": curv.n_total,
        "dtype": str(fm.dtype),
        "scoring_dtype": config.scoring_dtype,
        "task": type(task).__name__,
    }
    return InfluenceResult(
        scores=train_pass.scores if train_pass.scores is not None else torch.zeros(0, 0),
        train_indices=train_pass.indices,
        val_indices=val_pass.indices,
        self_influence=train_pass.self_influence,
        train_losses=train_pass.losses,
        train_targets=train_pass.targets,
        train_predictions=train_pass.predictions,
        val_losses=val_pass.losses,
        val_targets=val_pass.targets,
        val_predictions=val_pass.predictions,
        perturbation=perturbation,
        perturbation_indices=perturbation_indices,
        token_shares=token_shares,
        token_share_indices=token_share_indices,
        damping=float(damping),
        settings=settings,
        diagnostics=diagnostics,
    )


def _perturbations(
    fm: FunctionalModel,
    train: IndexedData,
    indices: Tensor,
    scores: Tensor,
    val_inverse: Tensor,
    k: int,
) -> tuple[Tensor, Tensor]:
    """``I_pert,loss`` maps for each validation point's top-k helpful and harmful examples.

    All (validation point, training example) pairs are differentiated together, in chunks of
    :func:`pairs_per_chunk` (at least a training batch); the pairs are ordered by training
    example, so that each chunk fetches each of its examples once.
    """
    k = min(k, scores.shape[0])
    pick = torch.cat(
        [torch.topk(scores.T, k, largest=False).indices, torch.topk(scores.T, k).indices], dim=1
    )  # [n_val, 2k] positions into the training rows
    rows = pick.reshape(-1)
    order = torch.argsort(rows, stable=True)
    vectors = torch.arange(pick.shape[0]).repeat_interleave(pick.shape[1])
    first = fm.prepare(train.fetch(indices[rows[order[:1]]])).inputs  # one input sizes the chunks
    input_numel = first[0].numel() if isinstance(first, Tensor) else 0
    chunk = pairs_per_chunk(fm, input_numel, train.batch_size)
    maps: Tensor | None = None
    for start in range(0, rows.numel(), chunk):
        pairs = order[start : start + chunk]
        examples, position = torch.unique(rows[pairs], return_inverse=True)
        batch = train.fetch(indices[examples])
        part = perturbation_pairs(fm, batch, val_inverse, position, vectors[pairs], chunk).cpu()
        if maps is None:
            maps = part.new_empty((rows.numel(), *part.shape[1:]))
        maps[pairs] = part
    assert maps is not None  # there is at least one pair
    return maps.reshape(*pick.shape, *maps.shape[1:]), indices[pick]


def influence_on_parameters(
    model: nn.Module,
    train_data: Data,
    indices: Sequence[int] | Tensor,
    config: InfluenceConfig | None = None,
    **options: Any,
) -> Tensor:
    """``I_up,params(z) = -(H + damping I)^-1 g(z)`` for the training examples at ``indices``.

    Returns ``[len(indices), p]``: the first-order change of the chosen (flattened) parameters per
    unit of upweighting; removing example ``z`` changes them by about ``-1/n`` times this.
    ``config`` and ``**options`` as for :func:`compute_influence` (solver, damping, task,
    parameters, curvature, batch_size and dtype are used).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence import Exact
        >>> data = TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
        >>> influence_on_parameters(torch.nn.Linear(3, 2), data, [0, 5], solver=Exact(),
        ...                         damping=0.1).shape
        torch.Size([2, 8])
    """
    config = _config(config, options)
    with evaluation_mode(model):
        fm = FunctionalModel(model, config.make_task(), config.parameters, config.torch_dtype)
        train = as_indexed(train_data, None, config.batch_size)
        chosen = example_pass(fm, as_indexed(train, indices), keep_gradients=True)
        assert chosen.gradients is not None
        curv, _ = choose_curvature(fm, train, config.curvature, config.damping, None, config.seed)
        solved, _ = config.make_solver().solve(curv, chosen.gradients, config.damping)
    return -solved
