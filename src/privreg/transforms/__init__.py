"""Spatial transforms mapping fixed-space world points to moving-space world points (ITK)."""

from .base import Transform
from .composite import CompositeTransform
from .itk_io import load_transform, save_transform, to_sitk_transform
from .linear import (AffineTransform, LinearTransform, RigidTransform, SimilarityTransform,
                     TranslationTransform, make_linear)
from .spline import (BSplineTransform, DisplacementFieldTransform, GridSplineTransform,
                     StationaryVelocityTransform)

__all__ = [
    "Transform", "CompositeTransform", "LinearTransform", "TranslationTransform", "RigidTransform",
    "SimilarityTransform", "AffineTransform", "make_linear", "BSplineTransform",
    "DisplacementFieldTransform", "GridSplineTransform", "StationaryVelocityTransform",
    "load_transform", "save_transform", "to_sitk_transform",
]
