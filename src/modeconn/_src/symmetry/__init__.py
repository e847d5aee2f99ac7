"""Permutation symmetry of a network, inferred from a trace: a union-find over axes, a table of rules."""
