"""Loss-landscape slices: the plane through three models, random filter-normalised slices, MLI.

Three views of the landscape around trained networks (ALGORITHMS.md §6):

- :func:`plane` — the 2-D plane through three models (Garipov et al. 2018, Fig. 1): Gram–Schmidt
  on ``θ1 − θ0`` and ``θ2 − θ0`` gives an orthonormal basis ``(e1, e2)``; the grid point ``(x, y)``
  is ``θ0 + x·e1 + y·e2``. A learned curve can be projected into the plane.
- :func:`random_slice` — 1-D / 2-D slices along random Gaussian directions with filter
  normalisation (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").
- :func:`monotonic_interpolation` — is the loss monotone on the straight line from initialisation
  to the trained solution (Lucas et al. 2021, "Analyzing Monotonic Linear Interpolation")?

Every grid point is evaluated through ``torch.func.functional_call``; BatchNorm statistics are
recomputed per point when ``bn_data`` is given. :func:`plot_plane` draws a plane as a contour plot.
"""

from __future__ import annotations

from .common import evaluate_state
from .plane import PlaneBasis, PlaneResult, plane, plot_plane
from .slices import (
    MLIResult,
    SliceResult,
    filter_normalized_direction,
    largest_bump,
    monotonic_interpolation,
    random_slice,
)

__all__ = [
    "MLIResult",
    "PlaneBasis",
    "PlaneResult",
    "SliceResult",
    "evaluate_state",
    "filter_normalized_direction",
    "largest_bump",
    "monotonic_interpolation",
    "plane",
    "plot_plane",
    "random_slice",
]
