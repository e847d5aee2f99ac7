"""Paths between networks: linear paths, Bezier curves, polygonal chains; fitting and evaluation."""

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

__all__ = [
    "BezierCurve",
    "ControlPointCurve",
    "CurveParametrization",
    "LinearPath",
    "Path",
    "PathEvaluation",
    "PolyChain",
    "bezier_coefficients",
    "evaluate_path",
    "fit_curve",
    "garipov_schedule",
    "initial_curve",
    "load_path",
    "polychain_coefficients",
    "save_path",
    "train_curve",
]
