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
from . import data, models
from ._src.adversarial import PGDConfig, pgd_attack, robust_evaluate
from ._src.io import Checkpoint, load_checkpoint, load_model, save_checkpoint
from ._src.hf import permute_checkpoint, save_model_folder
from ._src.train import TrainResult, train

# --- symmetry: spec inference ----------------------------------------------------------------
from ._src.symmetry import capture_sites, infer_spec, register_rule

# --- alignment ---------------------------------------------------------------------------------
from ._src.align import align, align_states, aligner_names, merge_many, register_aligner
from ._src.align import Aligner, AlignInputs, get_aligner
from ._src.align import activation_matching, weight_matching, weight_objective
from ._src.align import pam_align, sinkhorn_matching, ste_matching
from ._src.align import annealing_matching, ot_barycenter, ot_fusion, ot_matching, ot_transport
from ._src.norm import needs_bn_reset, repair, reset_bn, reset_bn_state

# --- paths and curves -----------------------------------------------------------------------
from ._src.paths import (
    BezierCurve,
    LinearPath,
    PathEvaluation,
    PolyChain,
    evaluate_path,
    fit_curve,
    load_path,
)
from ._src.report import plot_paths
from ._src import landscape
from ._src.paths.ensemble import EnsembleResult, curve_ensemble, evaluate_ensemble, fge

# --- the rest of the field (issue 12): SWA, instability, AutoNEB, simplexes, subspaces ---------
from ._src.swa import swa
from ._src.instability import InstabilityResult, instability
from ._src.paths import Simplex, autoneb, fit_simplex, fit_subspace, simplex_ensemble

# --- merging ---------------------------------------------------------------------------------
from ._src.merge import MergedState, MergeRecipe, merge, merge_files, merge_methods
from ._src.merge import streaming_methods

# --- release: validation, safety and what the CLI needs (it imports only this module) -------
from ._src.errors import NonFiniteError
from ._src.optional import MissingExtraError, require
from ._src.evaluation import model_device, resolve_device
from ._src.io import atomic_write
from ._src.io import _json_default as json_default
from ._src.validate import check_data_fits, check_finite_state, check_model_size
from ._src.trust import is_import_path, refuse_code
from ._src.merge.recipe import MergeRun, run_recipe
from ._src.paths.curves import curve_kinds
from ._src.paths.io import PATH_FILENAME
from ._src.demo import DemoConfig, run_demo

# --- sweeps and reports ----------------------------------------------------------------------
from ._src import sweep
from ._src.html_report import write_report

# The public names, by section (docs/API.md documents each). Keep in step with the imports above:
# tests/test_public_api.py checks that every imported public name is listed here and vice versa.
__all__ = [
    "__version__",
    # core: errors
    "ModeconnError", "CheckpointError", "ConfigError", "DataError", "IncompatibleModelsError",
    "SpecError",
    # core: evaluation and assignment
    "Metrics", "as_loader", "evaluate", "solve_assignment",
    # core: permutation specs
    "PermutationSpec", "Permutation", "Slot", "Site", "Heads", "apply_permutation",
    "check_permutation", "compose_permutations", "identity_permutation", "inverse_permutation",
    "random_permutation",
    # foundation: models, data, checkpoints, training, adversarial robustness
    "models", "data", "Checkpoint", "save_checkpoint", "load_checkpoint", "load_model",
    "save_model_folder", "permute_checkpoint",
    "TrainResult", "train", "PGDConfig", "pgd_attack", "robust_evaluate",
    # symmetry: spec inference
    "infer_spec", "capture_sites", "register_rule",
    # alignment
    "align", "align_states", "aligner_names", "register_aligner", "get_aligner", "Aligner",
    "AlignInputs", "pam_align", "ot_matching", "ot_transport", "ot_fusion", "ot_barycenter",
    "annealing_matching",
    "weight_matching",
    "weight_objective", "activation_matching", "ste_matching", "sinkhorn_matching", "merge_many",
    "reset_bn", "reset_bn_state", "needs_bn_reset", "repair",
    # paths and curves
    "LinearPath", "BezierCurve", "PolyChain", "PathEvaluation", "fit_curve", "evaluate_path",
    "load_path", "plot_paths", "landscape", "EnsembleResult", "curve_ensemble",
    "evaluate_ensemble", "fge",
    # the rest of the field: SWA, instability, AutoNEB, simplexes, subspaces
    "swa", "instability", "InstabilityResult", "autoneb", "Simplex", "fit_simplex",
    "simplex_ensemble", "fit_subspace",
    # merging
    "merge", "merge_methods", "MergedState", "MergeRecipe", "merge_files", "streaming_methods",
    # release: validation, safety, CLI support
    "NonFiniteError", "MissingExtraError", "require", "model_device", "resolve_device",
    "atomic_write", "json_default",
    "check_data_fits", "check_finite_state", "check_model_size", "is_import_path", "refuse_code",
    "MergeRun", "run_recipe", "curve_kinds", "PATH_FILENAME", "DemoConfig", "run_demo",
    # sweeps and reports
    "sweep", "write_report",
]  # fmt: skip
