"""How far the package's Gauss-Newton products are from a layer-wise one, on the 1M-parameter MLP.

``Curvature.batch_matvec`` computes ``J^T H_out J V`` with ``torch.func`` (forward mode for
``J V``, one reverse-mode graph for ``J^T``, vmapped over the rows of ``V``), for any model. For
the benchmark's ``Linear -> ReLU -> Linear`` the same product can be written by hand from the
layers' inputs and output gradients, the way the layer-wise scoring pass treats ``nn.Linear``:
tangents ``[m, batch, hidden]`` through the two layers, the softmax cross-entropy's output
Hessian, and the weight gradients as batched matrix products. The script times both on one
batch (CPU time, best of ``--repeat``, one thread), checks that they agree, and prints the
ratio: what a layer-wise curvature product could gain on dense layers.

With ``--factors`` it also times the products from per-layer factors of
``output_jacobians.py`` (each layer's inputs and the output Jacobian at its outputs, batched
matrix products; the factors built for each product, as a minibatch step would) and prints each
product per vector against one forward and backward pass on the same examples.

With ``--bf16`` it measures instead what bfloat16 products would cost in accuracy: a 100-2000-10
MLP trained 5 epochs on 1,000 points, 8 validation gradients solved by CG (damping 1e-3) with
float32 products and with products under ``torch.autocast(bfloat16)`` (float32 sums), and the
scores of 1,000 training points from both.

Usage::

    python benchmarks/layerwise_products.py                    # 8 and 32 vectors, 1,024 examples
    python benchmarks/layerwise_products.py --vectors 8 --batch 256
    python benchmarks/layerwise_products.py --vectors 8 --batch 256 1024 --factors
    python benchmarks/layerwise_products.py --bf16              # about 2 minutes
"""

from __future__ import annotations

import argparse
import time

import torch
from common import pearson, setup, spearman, timed
from synthetic import HIDDEN_1M, stacked, wide_mlp
from torch import Tensor, nn

from lightning_influence.core.curvature import Curvature
from lightning_influence.core.data import as_indexed
from lightning_influence.core.gradients import per_sample_gradients
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.task import ClassificationTask


def by_hand(model: nn.Sequential, x: Tensor, vectors: Tensor) -> Tensor:
    """Summed ``J^T H_out J v`` of ``Linear -> ReLU -> Linear`` with softmax cross-entropy, for
    each row of ``vectors`` (parameters in ``model.parameters()`` order)."""
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    (hidden, dim), classes, m = w1.shape, w2.shape[0], vectors.shape[0]
    v1, c1, v2, c2 = vectors.split([hidden * dim, hidden, classes * hidden, classes], dim=1)
    v1, v2 = v1.view(m, hidden, dim), v2.view(m, classes, hidden)
    z1 = torch.addmm(b1, x, w1.T)
    mask = (z1 > 0).to(x.dtype)
    a1 = z1 * mask
    probs = torch.softmax(torch.addmm(b2, a1, w2.T), dim=1)
    dz1 = (torch.matmul(x, v1.transpose(1, 2)) + c1[:, None, :]).mul_(mask)  # [m, batch, hidden]
    dz2 = torch.matmul(a1, v2.transpose(1, 2)) + dz1 @ w2.T + c2[:, None, :]  # [m, batch, classes]
    u = probs * dz2 - probs * (probs * dz2).sum(-1, keepdim=True)  # output Hessian times J v
    g1 = (u @ w2).mul_(mask)  # [m, batch, hidden]
    return torch.cat(
        [
            torch.matmul(g1.transpose(1, 2), x).reshape(m, -1),
            g1.sum(1),
            torch.matmul(u.transpose(1, 2), a1).reshape(m, -1),
            u.sum(1),
        ],
        dim=1,
    )


def bf16_accuracy(n: int = 1000, hidden: int = 2000, steps: int = 250) -> None:
    """Scores from CG solves with float32 and with bfloat16 products (see the module docstring)."""
    data, val = stacked(n), stacked(8, seed=1)
    model, (x, y) = wide_mlp(hidden), data.tensors
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(5):
        for i in range(0, n, 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    fm = FunctionalModel(model.eval(), ClassificationTask())
    curvature = Curvature(fm, as_indexed(data, batch_size=1024))
    g_val, g_train = per_sample_gradients(fm, *val.tensors), per_sample_gradients(fm, x, y)

    def damped(v: Tensor, bf16: bool) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return curvature.matvec(v).float() + 1e-3 * v

    def cg(bf16: bool) -> tuple[Tensor, float]:
        sol, r = torch.zeros_like(g_val), g_val.clone()
        p, rs = r.clone(), (r * r).sum(1)
        for _ in range(steps):
            ap = damped(p, bf16)
            a = rs / (p * ap).sum(1)
            sol += a[:, None] * p
            r -= a[:, None] * ap
            new = (r * r).sum(1)
            p, rs = r + (new / rs)[:, None] * p, new
        res = (g_val - damped(sol, False)).norm(dim=1) / g_val.norm(dim=1)
        return sol, float(res.max())

    v = torch.randn(4, fm.n_params)
    error = float((damped(v, True) - damped(v, False)).norm() / damped(v, False).norm())
    clock = time.process_time
    t32 = timed(lambda: cg(False), 1, clock=clock)
    t16 = timed(lambda: cg(True), 1, clock=clock)
    (s32, res32), (s16, res16) = t32.value, t16.value
    a, b = (g_train @ s16.T).flatten(), (g_train @ s32.T).flatten()
    print(f"bfloat16 products: relative error {error:.1e} per product; CG {steps} steps "
          f"float32 {t32.best:.0f} s (residual {res32:.1e}), bfloat16 {t16.best:.0f} s "
          f"(residual {res16:.1e}); scores Pearson {pearson(a, b):.4f}, "
          f"Spearman {spearman(a, b):.4f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--batch", type=int, nargs="+", default=[1024])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--factors", action="store_true", help="also from per-layer factors")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 products' accuracy instead")
    args = parser.parse_args()
    setup(threads=1)
    if args.bf16:
        bf16_accuracy()
        return
    model = wide_mlp(HIDDEN_1M)
    assert isinstance(model, nn.Sequential)
    for n in args.batch:
        compare(model, n, args.vectors, args.repeat, args.factors)


def compare(model: nn.Sequential, n: int, counts: list[int], repeat: int, factors: bool) -> None:
    """Print the products of ``counts`` vectors on ``n`` examples: the package's, by hand and
    (``factors``) from per-layer factors, each per vector against a forward and backward pass."""
    cpu = time.process_time
    fm = FunctionalModel(model, ClassificationTask())
    data = as_indexed(stacked(n))
    curvature = Curvature(fm, data)
    batch = data.fetch(data.indices)
    x, y = batch
    curvature.batch_matvec(data.fetch(data.indices[:2]), torch.zeros(1, fm.n_params))  # warm-up
    step = timed(lambda: _training_step(model, x, y), repeat, clock=cpu).best
    print(f"1M-parameter MLP ({fm.n_params:,} parameters), {n} examples, one thread; "
          f"forward + backward {step:.3f} s")  # fmt: skip
    from output_jacobians import LayerProducts

    lp = LayerProducts(fm)
    for m in counts:
        vectors = torch.randn(m, fm.n_params)
        curvature.batch_matvec(batch, vectors)  # the first block also times the passes
        ours = timed(lambda v=vectors: curvature.batch_matvec(batch, v), repeat, clock=cpu)
        hand = timed(lambda v=vectors: by_hand(model, x, v), repeat, clock=cpu)
        error = float((hand.value - ours.value).norm() / ours.value.norm())
        print(
            f"  {m:3d} vectors: torch.func {ours.best:6.2f} s ({ours.best / m / step:.2f}x "
            f"per vector), by hand {hand.best:6.2f} s ({hand.best / m / step:.2f}x) = "
            f"{ours.best / hand.best:.2f}x faster by hand (relative difference {error:.1e})"
        )
        if factors:
            built = timed(lambda: lp.factors(x, y), repeat, clock=cpu)
            fac = timed(lambda v=vectors: lp.products(lp.factors(x, y), v), repeat, clock=cpu)
            error = float((fac.value - ours.value).norm() / ours.value.norm())
            print(
                f"       from per-layer factors {fac.best:6.2f} s ({fac.best / m / step:.2f}x "
                f"per vector; the factors {built.best:.2f} s; relative difference {error:.1e})"
            )


def _training_step(model: nn.Module, x: Tensor, y: Tensor) -> None:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    model.zero_grad()


if __name__ == "__main__":
    main()
