"""Paths between networks: lines, curves, chains, simplexes; fitting, AutoNEB and evaluation."""

from .autoneb import autoneb
from .base import LinearPath, Path
from .curves import BezierCurve, PolyChain, bezier_coefficients, polychain_coefficients
from .evaluate import PathEvaluation, evaluate_path
from .fit import (
    ControlPointCurve,
    CurveParametrization,
    fit_curve,
    garipov_schedule,
    initial_curve,
    train_curve,
)
from .io import load_path, save_path
from .simplex import Simplex
from .spro import fit_simplex, simplex_ensemble
from .subspace import fit_subspace

__all__ = [
    "BezierCurve",
    "ControlPointCurve",
    "CurveParametrization",
    "LinearPath",
    "Path",
    "PathEvaluation",
    "PolyChain",
    "Simplex",
    "autoneb",
    "bezier_coefficients",
    "evaluate_path",
    "fit_curve",
    "fit_simplex",
    "fit_subspace",
    "garipov_schedule",
    "initial_curve",
    "load_path",
    "polychain_coefficients",
    "save_path",
    "simplex_ensemble",
    "train_curve",
]
