"""Greedy model soup: average a growing subset of the models, chosen on held-out accuracy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import Field
from torch import Tensor

from ..evaluation import evaluate
from .base import MergeInputs, MergeMethod, Params, State, merge_per_tensor, weighted_mean


class SoupParams(Params):
    """Parameters of :class:`GreedySoupMerge`."""

    batch_size: int = Field(1024, gt=0, description="evaluation batch size for a Dataset/tuple")


class GreedySoupMerge(MergeMethod):
    """Greedy soup (Wortsman et al., "Model soups", ICML 2022, Recipe 1).

    Sort the models by held-out accuracy, best first; the soup starts as the best model; each
    next model is added (the soup is the uniform average of its members,
    ``theta = 1/|S| sum_{i in S} theta_i``) only if the soup's held-out accuracy *strictly*
    improves. By construction the result's held-out accuracy is at least the best single model's.
    ``data`` is the held-out set (one source; not the models' training data). No weights.
    ``MergedState.info["soup"]`` lists the members and each model's accuracy.
    """

    Params = SoupParams
    needs_data = True
    weighted = False

    def run(self, states: Sequence[Mapping[str, Tensor]], params: SoupParams,
            inputs: MergeInputs) -> State:
        assert inputs.model is not None
        model = inputs.model

        def accuracy(state: Mapping[str, Tensor]) -> float:
            return evaluate(model, inputs.data, state=state, device=inputs.device,
                            batch_size=params.batch_size).accuracy

        def soup(members: list[int]) -> State:
            chosen = [states[i] for i in members]
            ones = [1.0] * len(chosen)
            return merge_per_tensor(chosen, ones, lambda k, ts: weighted_mean(ts, ones))

        accs = [accuracy(s) for s in states]
        order = sorted(range(len(states)), key=lambda i: -accs[i])  # stable: ties keep input order
        members = [order[0]]
        best = accs[order[0]]
        current = soup(members)
        for i in order[1:]:
            candidate = soup([*members, i])
            acc = accuracy(candidate)
            if acc > best:
                members, best, current = [*members, i], acc, candidate
        inputs.info["soup"] = {"members": members, "accuracies": accs, "soup_accuracy": best}
        return current
