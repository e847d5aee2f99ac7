"""Tests of the core helpers every area stands on: state combination, compatibility, evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modeconn._src.errors import DataError, IncompatibleModelsError
from modeconn._src.evaluation import as_loader, evaluate, with_state
from modeconn._src.state import check_compatible, check_finite, combine, lerp


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.randn(3, generator=g).to(torch.float64),
        "steps": torch.tensor(7 + seed),
    }


def test_combine_matches_manual_sum_and_keeps_dtype_and_non_float():
    a, b = _state(0), _state(1)
    out = combine([a, b], [0.3, 0.7])
    assert torch.allclose(out["w"], 0.3 * a["w"] + 0.7 * b["w"], atol=1e-6)
    assert out["b"].dtype == torch.float64
    assert int(out["steps"]) == 7  # non-float tensors come from the first state
    assert out["w"] is not a["w"]


def test_lerp_is_exact_at_the_ends_and_linear_between():
    a, b = _state(0), _state(1)
    assert all(torch.equal(lerp(a, b, 0.0)[k], a[k]) for k in a)
    assert all(torch.equal(lerp(a, b, 1.0)[k], b[k]) for k in a)
    mid = lerp(a, b, 0.25)["w"]
    assert torch.allclose(mid, 0.75 * a["w"] + 0.25 * b["w"], atol=1e-6)


def test_check_compatible_names_the_first_differing_tensor():
    a, b = _state(0), _state(1)
    check_compatible([a, b])
    b["w"] = torch.zeros(3, 5)
    with pytest.raises(IncompatibleModelsError, match="'w'"):
        check_compatible([a, b])
    c = dict(_state(1))
    del c["b"]
    with pytest.raises(IncompatibleModelsError, match="'b'"):
        check_compatible([a, c], names=["A", "C"])


def test_check_finite_refuses_nan():
    s = _state(0)
    check_finite(s)
    s["w"][0, 0] = float("nan")
    with pytest.raises(IncompatibleModelsError, match="NaN"):
        check_finite(s, "model B")


def test_as_loader_accepts_tuple_dataset_and_loader_and_rejects_others():
    x, y = torch.randn(10, 2), torch.arange(10) % 2
    loader = as_loader((x, y), batch_size=4)
    assert [len(b[0]) for b in loader] == [4, 4, 2]
    assert as_loader(loader) is loader
    with pytest.raises(DataError, match="rows"):
        as_loader((x, y[:3]))
    with pytest.raises(DataError, match="DataLoader"):
        as_loader([1, 2, 3])


def test_evaluate_with_state_equals_loading_the_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    via_state = evaluate(model, (x, y), state=other.state_dict())
    direct = evaluate(other, (x, y))
    assert via_state.loss == pytest.approx(direct.loss, rel=1e-6)
    assert via_state.accuracy == direct.accuracy
    manual = nn.functional.cross_entropy(other(x), y).item()
    assert direct.loss == pytest.approx(manual, rel=1e-5)
    loaded = with_state(model, other.state_dict())
    assert torch.equal(loaded(x), other(x)) and loaded is not model


def test_evaluate_input_transform_sees_the_forward_and_replaces_the_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    seen = []

    def zero_inputs(forward, xb, yb):
        seen.append(forward(xb).shape)  # the forward works (with gradients) inside the hook
        return torch.zeros_like(xb)

    via_hook = evaluate(model, (x, y), input_transform=zero_inputs, batch_size=8)
    direct = evaluate(model, (torch.zeros_like(x), y))
    assert seen == [torch.Size([8, 3]), torch.Size([8, 3]), torch.Size([4, 3])]
    assert via_hook.loss == pytest.approx(direct.loss) and via_hook.accuracy == direct.accuracy
