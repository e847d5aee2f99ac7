"""Paths between networks: linear paths, Bezier curves, polygonal chains; fitting and evaluation."""

from .base import LinearPath, Path
from .curves import BezierCurve, PolyChain, bezier_coefficients, polychain_coefficients
from .evaluate import PathEvaluation, evaluate_path
from .io import load_path, save_path

__all__ = [
    "BezierCurve",
    "LinearPath",
    "Path",
    "PathEvaluation",
    "PolyChain",
    "bezier_coefficients",
    "evaluate_path",
    "load_path",
    "polychain_coefficients",
    "save_path",
]
