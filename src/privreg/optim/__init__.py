"""Optimisers: Gauss-Newton / Levenberg-Marquardt on seam objectives, first-order on autograd ones."""

from .first_order import FirstOrderOptions, minimize_autograd
from .gauss_newton import GNOptions, gauss_newton

__all__ = ["GNOptions", "gauss_newton", "FirstOrderOptions", "minimize_autograd"]
