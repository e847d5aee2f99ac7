"""Merge-many alignment: bring N models into one common unit order by weight matching."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import SpecError
from ..progress import progress_bar
from ..spec import (
    Permutation,
    PermutationSpec,
    apply_permutation,
    compose_permutations,
    identity_permutation,
    inverse_permutation,
)
from ..state import check_compatible, check_finite, combine
from .weight import weight_matching


def merge_many(
    spec: PermutationSpec,
    states: Sequence[Mapping[str, Tensor]],
    *,
    max_iter: int = 100,
    seed: int = 0,
    fix_first: bool = True,
    inner_max_iter: int = 100,
    progress: bool = False,
) -> list[Permutation]:
    """Merge-many alignment (Ainsworth et al., Git Re-Basin, ICLR 2023, "MergeMany"; used by
    Sharma et al. 2024 for simultaneous linear connectivity).

    Each outer round visits the models in a fresh random order and re-aligns model ``i`` to the
    running average of the others,

        pi_i <- argmax_pi  J(mean_{j != i} pi_j(theta_j), pi(theta_i))

    by weight matching (warm-started from the current ``pi_i``); it stops after a round in which
    no permutation changed, or after ``max_iter`` rounds. All N permutations are free during the
    search; with ``fix_first`` (default) they are finally re-expressed in model 0's unit order
    (``pi_i <- pi_0^{-1} o pi_i``, so ``pi_0`` is the identity), which changes no relative
    alignment.

    Args:
        spec: the shared permutation spec.
        states: N >= 2 state dicts of one architecture (not modified).
        max_iter: maximum outer rounds.
        seed: seeds the visiting order and the inner weight matching.
        fix_first: express the result in model 0's frame (``result[0]`` is the identity).
        inner_max_iter: ``max_iter`` of each weight-matching call.
        progress: show a progress bar over rounds.

    Returns:
        One :class:`Permutation` per model; ``apply_permutation(spec, result[i], states[i])``
        are the aligned models (average them to merge). ``result[0].info`` holds ``rounds`` and
        ``converged``.

    Example:
        >>> import torch, modeconn as mc
        >>> spec = mc.PermutationSpec.from_axes({"h": 3}, {"w": ("h", None), "v": (None, "h")})
        >>> a = {"w": torch.randn(3, 2), "v": torch.randn(2, 3)}
        >>> ps = [mc.random_permutation(spec, seed=s) for s in range(3)]
        >>> perms = merge_many(spec, [mc.apply_permutation(spec, p, a) for p in ps])
        >>> [torch.equal(q["h"], torch.argsort(p["h"])[ps[0]["h"]]) for p, q in zip(ps, perms)]
        [True, True, True]
    """
    if len(states) < 2:
        raise SpecError(f"merge_many needs at least 2 models, got {len(states)}")
    check_compatible(states)
    spec.check(states[0])
    for i, s in enumerate(states):
        check_finite(s, f"model {i}")
    n = len(states)
    perms = [identity_permutation(spec) for _ in range(n)]
    aligned = [dict(s) for s in states]
    gen = torch.Generator().manual_seed(seed)
    rounds, converged = 0, False
    with progress_bar(progress, total=max_iter, description="merge-many rounds") as advance:
        for _ in range(max_iter):
            rounds += 1
            changed = False
            for i in torch.randperm(n, generator=gen).tolist():
                others = [aligned[j] for j in range(n) if j != i]
                ref = combine(others, [1.0 / len(others)] * len(others))
                p = weight_matching(
                    spec, ref, states[i], max_iter=inner_max_iter, seed=seed + rounds, init=perms[i]
                )
                if any(not torch.equal(p[g], perms[i][g]) for g in spec.groups):
                    changed = True
                    perms[i] = Permutation({g: p[g] for g in spec.groups})
                    aligned[i] = apply_permutation(spec, perms[i], states[i])
            advance(None)
            if not changed:
                converged = True
                break
    if fix_first:
        back = inverse_permutation(perms[0])
        perms = [compose_permutations(p, back) for p in perms]
    info = {"method": "merge_many", "rounds": rounds, "converged": converged}
    return [Permutation(p, info=info) for p in perms]
