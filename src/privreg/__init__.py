"""privreg: medical image registration in the clear and under privacy constraints."""

from .errors import InputError, PrivregError
from .grid import Grid
from . import evaluate, quality
from .image import Image, read_image, resample, write_image
from .register import RegistrationConfig, RegistrationResult, register
from .sampling import Sampling
from .transforms import load_transform, save_transform

__version__ = "0.1.0"

__all__ = ["Grid", "Image", "read_image", "write_image", "resample", "register", "RegistrationConfig",
           "RegistrationResult", "Sampling", "load_transform", "save_transform", "InputError", "PrivregError"]
