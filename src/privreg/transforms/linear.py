"""Linear transforms: translation, rigid, similarity, affine.

All share W(x) = A (x - c) + t + c with a fixed centre c (ITK's MatrixOffsetTransformBase).
For Gauss-Newton every linear transform is differentiated through the "dense" affine
parameters M = [A | t] (d x (d+1)); W is linear in M with basis Phi(x) = [x - c, 1].
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .base import Transform

F64 = torch.float64


def _skew(w: Tensor) -> Tensor:
    z = torch.zeros((), dtype=w.dtype)
    return torch.stack([
        torch.stack([z, -w[2], w[1]]),
        torch.stack([w[2], z, -w[0]]),
        torch.stack([-w[1], w[0], z]),
    ])


def rotation_matrix(rot: Tensor, ndim: int) -> Tensor:
    """Rotation from an angle (2D, radians) or a rotation vector (3D, axis*angle)."""
    if ndim == 2:
        c, s = torch.cos(rot[0]), torch.sin(rot[0])
        return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    return torch.linalg.matrix_exp(_skew(rot))


def rotation_vector(r: Tensor) -> Tensor:
    """Inverse of :func:`rotation_matrix` for 3D (log map)."""
    r = r.to(F64)
    cos = torch.clamp((torch.trace(r) - 1) / 2, -1.0, 1.0)
    angle = torch.arccos(cos)
    if angle < 1e-8:
        return torch.zeros(3, dtype=F64)
    w = torch.stack([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    if math.pi - float(angle) < 1e-4:
        # near pi: axis from the symmetric part
        b = (r + torch.eye(3, dtype=F64)) / 2
        axis = b[torch.argmax(torch.diagonal(b))]
        axis = axis / torch.linalg.norm(axis)
        return axis * angle
    return w / (2 * torch.sin(angle)) * angle


class LinearTransform(Transform):
    """Base of the linear family; subclasses define ``matrix_translation()`` from ``theta``."""

    def __init__(self, ndim: int, theta: Tensor, center: Sequence[float] | Tensor | None = None) -> None:
        super().__init__(ndim)
        self._theta = nn.Parameter(theta.to(F64))
        c = torch.zeros(ndim, dtype=F64) if center is None else torch.as_tensor(center, dtype=F64)
        self.register_buffer("center", c.clone())

    @property
    def theta(self) -> Tensor:
        return self._theta

    @property
    def is_linear(self) -> bool:
        return True

    def matrix_translation(self, theta: Tensor | None = None) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def dense_params(self, theta: Tensor | None = None) -> Tensor:
        """M = [A | t] flattened row-major, shape (d*(d+1),)."""
        a, t = self.matrix_translation(theta)
        return torch.cat([a, t[:, None]], dim=1).reshape(-1)

    def dense_jacobian(self) -> Tensor:
        """d M / d theta, shape (d*(d+1), num_params)."""
        th = self.theta.detach().clone()
        return torch.autograd.functional.jacobian(self.dense_params, th)

    def homogeneous(self) -> Tensor:
        """(d+1)x(d+1) matrix of W acting on homogeneous world points."""
        a, t = self.matrix_translation()
        d = self.ndim
        m = torch.eye(d + 1, dtype=F64)
        m[:d, :d] = a
        m[:d, d] = t + self.center - a @ self.center
        return m

    def forward(self, points: Tensor) -> Tensor:
        a, t = self.matrix_translation()
        c = self.center
        out = (points.to(F64) - c) @ a.T + t + c
        return out.to(points.dtype)

    def basis(self, points: Tensor) -> Tensor:
        """Phi(x) = [x - c, 1], shape (N, d+1): W_k(x) = sum_j M_kj Phi_j(x)."""
        p = points.to(F64) - self.center
        return torch.cat([p, torch.ones(p.shape[0], 1, dtype=F64)], dim=1)

    def to_affine(self) -> "AffineTransform":
        a, t = self.matrix_translation()
        return AffineTransform(self.ndim, a.detach(), t.detach(), self.center)


class TranslationTransform(LinearTransform):
    def __init__(self, ndim: int, translation: Sequence[float] | Tensor | None = None,
                 center: Sequence[float] | Tensor | None = None) -> None:
        t = torch.zeros(ndim, dtype=F64) if translation is None else torch.as_tensor(translation, dtype=F64)
        super().__init__(ndim, t.clone(), center)

    def matrix_translation(self, theta=None):
        th = self.theta if theta is None else theta
        return torch.eye(self.ndim, dtype=F64), th


class RigidTransform(LinearTransform):
    """Rotation (2D angle / 3D rotation vector, radians) then translation, about ``center``."""

    def __init__(self, ndim: int, rotation: Sequence[float] | Tensor | None = None,
                 translation: Sequence[float] | Tensor | None = None,
                 center: Sequence[float] | Tensor | None = None) -> None:
        nr = 1 if ndim == 2 else 3
        r = torch.zeros(nr, dtype=F64) if rotation is None else torch.as_tensor(rotation, dtype=F64).reshape(nr)
        t = torch.zeros(ndim, dtype=F64) if translation is None else torch.as_tensor(translation, dtype=F64)
        super().__init__(ndim, torch.cat([r, t]), center)
        self.nrot = nr

    def matrix_translation(self, theta=None):
        th = self.theta if theta is None else theta
        return rotation_matrix(th[: self.nrot], self.ndim), th[self.nrot:]


class SimilarityTransform(RigidTransform):
    """Rigid plus isotropic scale exp(s); theta = (rotation, translation, log-scale)."""

    def __init__(self, ndim: int, rotation=None, translation=None, log_scale: float = 0.0, center=None) -> None:
        super().__init__(ndim, rotation, translation, center)
        with torch.no_grad():
            self._theta = nn.Parameter(torch.cat([self._theta.detach(), torch.tensor([log_scale], dtype=F64)]))

    def matrix_translation(self, theta=None):
        th = self.theta if theta is None else theta
        r = rotation_matrix(th[: self.nrot], self.ndim)
        return torch.exp(th[-1]) * r, th[self.nrot: self.nrot + self.ndim]


class AffineTransform(LinearTransform):
    """General affine; theta = (A row-major, t), as ITK's AffineTransform parameters."""

    def __init__(self, ndim: int, matrix: Tensor | None = None, translation: Tensor | None = None,
                 center: Sequence[float] | Tensor | None = None) -> None:
        a = torch.eye(ndim, dtype=F64) if matrix is None else torch.as_tensor(matrix, dtype=F64)
        t = torch.zeros(ndim, dtype=F64) if translation is None else torch.as_tensor(translation, dtype=F64)
        super().__init__(ndim, torch.cat([a.reshape(-1), t]), center)

    def matrix_translation(self, theta=None):
        th = self.theta if theta is None else theta
        d = self.ndim
        return th[: d * d].reshape(d, d), th[d * d:]

    def dense_params(self, theta=None):
        th = self.theta if theta is None else theta
        d = self.ndim
        return torch.cat([th[: d * d].reshape(d, d), th[d * d:, None]], dim=1).reshape(-1)

    def dense_jacobian(self) -> Tensor:
        d = self.ndim
        n = d * (d + 1)
        jac = torch.zeros(n, n, dtype=F64)
        for k in range(d):
            for j in range(d):
                jac[k * (d + 1) + j, k * d + j] = 1.0
            jac[k * (d + 1) + d, d * d + k] = 1.0
        return jac

    @staticmethod
    def from_homogeneous(m: Tensor, center: Sequence[float] | Tensor | None = None) -> "AffineTransform":
        d = m.shape[0] - 1
        m = m.to(F64)
        c = torch.zeros(d, dtype=F64) if center is None else torch.as_tensor(center, dtype=F64)
        a = m[:d, :d]
        t = m[:d, d] - c + a @ c
        return AffineTransform(d, a, t, c)


LINEAR_KINDS = {
    "translation": TranslationTransform,
    "rigid": RigidTransform,
    "similarity": SimilarityTransform,
    "affine": AffineTransform,
}


def make_linear(kind: str, ndim: int, center: Tensor, init: LinearTransform | None = None) -> LinearTransform:
    """A linear transform of ``kind`` about ``center``, initialised from ``init`` where possible."""
    if kind not in LINEAR_KINDS:
        raise ValueError(f"unknown linear transform {kind!r}; choose from {sorted(LINEAR_KINDS)}")
    if init is None:
        return LINEAR_KINDS[kind](ndim, center=center)
    a, t = (x.detach() for x in init.matrix_translation())
    # express init about the new centre: W(x) = A(x - c') + t' + c'
    t_new = t + init.center - center + a @ (center - init.center)
    if kind == "affine":
        return AffineTransform(ndim, a, t_new, center)
    if kind == "translation":
        return TranslationTransform(ndim, t_new, center)
    scale = torch.linalg.det(a).abs() ** (1.0 / ndim)
    u, _, vh = torch.linalg.svd(a)
    r = u @ vh
    if torch.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vh
    rot = torch.atan2(r[1, 0], r[0, 0]).reshape(1) if ndim == 2 else rotation_vector(r)
    if kind == "rigid":
        return RigidTransform(ndim, rot, t_new, center)
    return SimilarityTransform(ndim, rot, t_new, float(torch.log(scale)), center)
