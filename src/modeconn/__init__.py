"""modeconn: mode connectivity for PyTorch — symmetry, alignment, curves, merging.

The curated public surface (see docs/API.md). Implementation lives in private ``_src`` modules.
Each section below is owned by one area of the library.
"""

from __future__ import annotations

from ._version import __version__

# --- core: errors, specs, state helpers -------------------------------------------------------
from ._src.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    IncompatibleModelsError,
    ModeconnError,
    SpecError,
)
from ._src.evaluation import Metrics, as_loader, evaluate
from ._src.spec import (
    Heads,
    Permutation,
    PermutationSpec,
    Site,
    Slot,
    apply_permutation,
    check_permutation,
    compose_permutations,
    identity_permutation,
    inverse_permutation,
    random_permutation,
)
from ._src.assign import solve_assignment

# --- foundation: models, data, checkpoints, training -----------------------------------------

# --- symmetry: spec inference ----------------------------------------------------------------

# --- alignment ---------------------------------------------------------------------------------

# --- paths and curves -----------------------------------------------------------------------

# --- merging ---------------------------------------------------------------------------------

__all__ = [name for name in dir() if not name.startswith("_")]
