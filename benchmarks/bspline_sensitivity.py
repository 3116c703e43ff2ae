"""How sensitive is the clear B-spline Gauss-Newton run of bench_ppir.py to a tiny input change?

Registers the bench's 2D B-spline case twice, once with the fixed image perturbed by Gaussian
noise of 1e-7 of its range, and prints the displacement RMSE between the two results (over the
grid and inside the head) and each run's error against the known field. If the clear engine moves
by millimetres under such a perturbation, a private run cannot be expected to match it closer.

Usage:  python benchmarks/bspline_sensitivity.py
"""

import torch
from privreg.demo import data_path, known_bspline
from privreg.image import Image, read_image, resample, smooth
from privreg.register import register
from privreg.sampling import Sampling
from privreg.evaluate import displacement_rmse, mean_displacement_error
src = read_image(data_path("BrainT1Slice.png"))
moving = Image(smooth(src.data, src.grid, 0.5), src.grid); grid = moving.grid
truth = known_bspline(grid, 20.0, 4.0, seed=1)
fixed = resample(moving, grid, truth)
for rw in (1e-3, 3e-3, 1e-2):  # 3e-3 is the default (relative to the data term)
    kw = dict(transform="bspline", metric="ssd", levels=(2, 1), max_iter=30, grid_spacing=20.0, reg_weight=rw, sampling=Sampling("urs", 0.2, seed=3, redraw=False))
    mask = (fixed.data > 0.05 * fixed.data.max()).reshape(-1)
    a = register(fixed, moving, **kw)
    g = torch.Generator().manual_seed(0)
    fixed2 = Image(fixed.data + 1e-7 * fixed.data.abs().max() * torch.randn(fixed.data.shape, generator=g, dtype=fixed.data.dtype), grid)
    b = register(fixed2, moving, **kw)
    print(rw, "its", a.report["iterations"], b.report["iterations"], "rmse a-b", float(displacement_rmse(a.transform, b.transform, grid)), "in head", float(displacement_rmse(a.transform, b.transform, grid, mask)),
          "err a", float(mean_displacement_error(a.transform, truth, grid, mask)), "err b", float(mean_displacement_error(b.transform, truth, grid, mask)))
