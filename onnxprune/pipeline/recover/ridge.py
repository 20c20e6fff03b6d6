"""The ridge maths, pure numpy: Gram matrices accumulated batch by batch, the regularised solve towards the
pruned weights W0, a path of strengths from one eigendecomposition, and the strength chosen on held-out rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from onnxprune.runtime import linalg

# lambda = alpha * mean(diag(A)); inf keeps W0 and refits the bias only

ALPHAS = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, float("inf"))


@dataclass

class Gram:
    a: np.ndarray
    b: np.ndarray
    yy: float = 0.0
    rows: int = 0

    def add(self, x: np.ndarray, y: np.ndarray, with_a: bool = True) -> None:
        """Add rows; `with_a=False` when `a` is shared with another Gram that already added these rows."""
        if with_a:
            self.a += x.T @ x
        self.b += x.T @ y
        self.yy += float((y * y).sum())
        self.rows += len(x)

    def error(self, theta: np.ndarray) -> float:
        """||X theta - Y||^2 from the accumulated sums."""
        return float(((self.a @ theta) * theta).sum() - 2 * (self.b * theta).sum() + self.yy)


def solve(a: np.ndarray, b: np.ndarray, theta0: np.ndarray, alpha: float, intercept: bool) -> np.ndarray:
    """argmin ||X t - Y||^2 + lam ||t_w - t0_w||^2, lam = alpha * mean diag(A); the intercept row is free."""
    d = a.shape[0]
    nw = d - 1 if intercept else d
    if np.isinf(alpha):
        theta = theta0.copy()
        if intercept:  # weights fixed: the best bias for them
            n = a[-1, -1]
            theta[-1] = (b[-1] - a[-1, :nw] @ theta0[:nw]) / max(n, 1e-12)
        return theta
    lam = alpha * max(float(np.trace(a[:nw, :nw])) / max(nw, 1), 1e-12)
    reg = np.zeros(d)
    reg[:nw] = lam
    lhs = a + np.diag(reg)
    rhs = b + reg[:, None] * theta0
    try:
        return linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


class RidgePath:
    """The ridge solutions of one Gram matrix A for any right-hand side and any strength, from one
    eigendecomposition: layers that read the same rows (q, k and v of an attention block; gate and up of a
    SwiGLU MLP) share A, so they share this too.

    The free intercept is eliminated by centring: with n rows, column sums s_x, s_y,
    A_c = A_ww - s_x s_x^T / n and B_c = B_w - s_x s_y^T / n, the weights solve (A_c + lam I) W = B_c + lam W0
    and the intercept is (s_y - s_x^T W) / n. With A_c = V diag(e) V^T, W = V diag(1 / (e + lam)) V^T
    (B_c + lam W0): a matrix product per alpha instead of a factorisation.
    """

    def __init__(self, a: np.ndarray, intercept: bool):
        d = a.shape[0]
        self.intercept = intercept
        self.nw = nw = d - 1 if intercept else d
        self.scale = max(float(np.trace(a[:nw, :nw])) / max(nw, 1), 1e-12)
        if intercept:
            self.n = max(a[-1, -1], 1e-12)
            self.sx = a[:nw, -1]
            ac = a[:nw, :nw] - np.outer(self.sx, self.sx) / self.n
        else:
            ac = a
        e, self.v = linalg.eigh(ac)
        self.e = np.maximum(e, 0.0)

    def thetas(self, b: np.ndarray, theta0: np.ndarray, alphas: Sequence[float]) -> list[np.ndarray]:
        projected = self.project(b, theta0)
        return [self.theta(projected, theta0, alpha) for alpha in alphas]

    def project(self, b: np.ndarray, theta0: np.ndarray) -> tuple:
        """What every strength's solution for right-hand side `b` shares: b and theta0 in the eigenbasis."""
        nw, v = self.nw, self.v
        sy = b[-1] if self.intercept else None
        bc = b[:nw] - np.outer(self.sx, sy) / self.n if self.intercept else b
        return v.T @ bc, v.T @ theta0[:nw], sy

    def theta(self, projected: tuple, theta0: np.ndarray, alpha: float) -> np.ndarray:
        """The solution at strength `alpha` from `project`'s result: one matrix product."""
        p, q, sy = projected
        if np.isinf(alpha):
            w = theta0[:self.nw]
        else:
            lam = alpha * self.scale
            w = self.v @ ((p + lam * q) / np.maximum(self.e + lam, 1e-300)[:, None])
        return np.vstack([w, ((sy - self.sx @ w) / self.n)[None, :]]) if self.intercept else w


def solve_path(a: np.ndarray, b: np.ndarray, theta0: np.ndarray, alphas: Sequence[float],
               intercept: bool) -> list[np.ndarray]:
    """`solve` for every alpha from one eigendecomposition (RidgePath)."""
    return RidgePath(a, intercept).thetas(b, theta0, alphas)


def select_alpha(fit: Gram, held: Gram, theta0: np.ndarray, intercept: bool,
                 alphas: Sequence[float] = ALPHAS, path: RidgePath | None = None) -> tuple[float, list[float]]:
    """The alpha whose fit on `fit` has the smallest error on `held` (ties go to the larger alpha), and the
    errors of the alphas tried; `path`: fit.a's RidgePath when the caller shares it.

    Coarse to fine: every third alpha of the grid and the last, then the neighbours (up to two steps) of the
    best of those. A strength costs two d x d x outputs products (its solution and its held-out error), the
    grid is ordered, and the held-out error along it falls to one valley (more rows than features: the
    smallest strengths; few or noisy rows: a larger one), so 6 to 8 of the 10 strengths find the strength a
    sweep of all of them finds."""
    path = path if path is not None else RidgePath(fit.a, intercept)
    projected = path.project(fit.b, theta0)
    errors: dict[int, float] = {}

    def tried(indices) -> None:
        for i in indices:
            if i not in errors and 0 <= i < len(alphas):
                errors[i] = held.error(path.theta(projected, theta0, alphas[i]))

    def best() -> int:
        lowest = min(errors.values())
        return max(i for i, e in errors.items() if e <= lowest + 1e-9 * abs(lowest))

    tried(sorted({*range(0, len(alphas), 3), len(alphas) - 1}))
    centre = best()
    tried(range(centre - 2, centre + 3))
    return alphas[best()], [errors[i] for i in sorted(errors)]
