"""Permutation symmetry inferred from a trace: a union-find over tensor axes and a table of rules.

Modules: :mod:`.axes` (the union-find), :mod:`.tracer` (torch.fx with example values),
:mod:`.registry` (the table of rules), :mod:`.walk` (the graph walk), ``rules_*`` (the rules),
:mod:`.attention` (attention rules and head resolution), :mod:`.emit` (the spec),
:mod:`.verify` (the last guard), :mod:`.capture` (site tensors), :mod:`.api`.
"""

from .api import infer_spec, register_rule
from .capture import capture_sites

__all__ = ["infer_spec", "register_rule", "capture_sites"]
