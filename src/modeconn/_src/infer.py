"""Old import path of ``infer_spec``/``capture_sites``, kept for code written against it (new code:
``modeconn._src.symmetry``, or the public ``modeconn``)."""

from .symmetry import capture_sites, infer_spec

__all__ = ["infer_spec", "capture_sites"]
