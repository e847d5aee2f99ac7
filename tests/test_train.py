"""Training (determinism, schedules, accuracy on MNIST-1D/digits) and PGD attacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeconn as mc
from modeconn._src.train import DivergedError


def _tiny(digits_splits, seed=0):
    return mc.models.create("mlp", input_shape=(1, 8, 8), width=32, depth=1, seed=seed)


def _small_data(digits_splits, n=300):
    x, y = digits_splits.tensors("train")
    return x[:n], y[:n]


def test_same_seed_bit_identical_and_inputs_untouched(digits_splits):
    model = _tiny(digits_splits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    data = _small_data(digits_splits)
    r1 = mc.train(model, data, epochs=2, seed=5, progress=False)
    r2 = mc.train(model, data, epochs=2, seed=5, progress=False)
    r3 = mc.train(model, data, epochs=2, seed=6, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # global RNG left alone
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # not mutated
    s1, s2, s3 = (r.model.state_dict() for r in (r1, r2, r3))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)  # the seed changes the data order
    assert r1.model is not model and not r1.model.training


def test_metrics_match_independent_evaluation(digits_splits):
    r = mc.train(_tiny(digits_splits), digits_splits, epochs=3, progress=False)
    test = mc.evaluate(r.model, digits_splits.test)
    train = mc.evaluate(r.model, digits_splits.train)
    assert r.metrics["test_accuracy"] == pytest.approx(test.accuracy)
    assert r.metrics["test_loss"] == pytest.approx(test.loss, rel=1e-6)
    assert r.metrics["train_accuracy"] == pytest.approx(train.accuracy)
    assert [h["epoch"] for h in r.history] == [1, 2, 3]
    assert r.history[-1]["loss"] < r.history[0]["loss"]
    assert r.config["epochs"] == 3 and r.config["optimizer"] == "sgd"


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # lr recorded after each epoch's last step; 4 epochs of 3 steps (300 examples, batch 100)
        ("constant", [0.1, 0.1, 0.1, 0.1]),
        ("step", [0.1, 0.1, 0.01, 0.001]),
    ],
)
def test_schedules(digits_splits, schedule, expected):
    r = mc.train(
        _tiny(digits_splits), _small_data(digits_splits), epochs=4, lr=0.1, batch_size=100,
        schedule=schedule, progress=False,
    )  # fmt: skip
    assert [h["lr"] for h in r.history] == pytest.approx(expected)


def test_cosine_schedule_closed_form(digits_splits):
    import math

    r = mc.train(
        _tiny(digits_splits), _small_data(digits_splits), epochs=4, lr=0.2, batch_size=100,
        progress=False,
    )  # fmt: skip
    total = 12
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * (3 * e - 1) / total)) for e in range(1, 5)]
    assert [h["lr"] for h in r.history] == pytest.approx(expected)


def test_adam_and_bad_options(digits_splits):
    data = _small_data(digits_splits)
    r = mc.train(_tiny(digits_splits), data, epochs=2, lr=1e-2, optimizer="adam", progress=False)
    assert r.metrics["train_accuracy"] > 0.5
    with pytest.raises(mc.ConfigError, match="unknown optimizer 'rmsprop'"):
        mc.train(_tiny(digits_splits), data, optimizer="rmsprop")
    with pytest.raises(mc.ConfigError, match="unknown schedule"):
        mc.train(_tiny(digits_splits), data, schedule="linear")
    with pytest.raises(mc.ConfigError, match="eps"):
        mc.train(_tiny(digits_splits), data, adversarial={"eps": -1, "step": 0.1, "steps": 1})
    with pytest.raises(DivergedError, match="diverged"):
        mc.train(_tiny(digits_splits), data, epochs=3, lr=1e8, progress=False)


# --- PGD ----------------------------------------------------------------------------------------


def test_pgd_one_step_is_fgsm_closed_form():
    # For a linear softmax classifier, d CE / d x = W^T (softmax(Wx + b) - onehot(y)) / n.
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    p = torch.softmax(lin(x), -1) - F.one_hot(y, 3).float()
    expected = x + 0.3 * torch.sign(p @ lin.weight.detach())
    adv = mc.pgd_attack(lin, x, y, eps=0.3, step=0.3, steps=1, random_start=False)
    torch.testing.assert_close(adv, expected)
    assert lin.weight.grad is None  # no gradient reaches the parameters


def test_pgd_stays_in_ball_raises_loss_and_is_seeded(trained, digits_splits):
    model = trained("mlp", "digits", epochs=3)
    x, y = digits_splits.tensors("test")
    x, y = x[:200], y[:200]
    kw = {"eps": 0.3, "step": 0.1, "steps": 5}
    adv = mc.pgd_attack(model, x, y, seed=1, **kw)
    assert float((adv - x).abs().max()) <= 0.3 + 1e-6
    assert torch.equal(adv, mc.pgd_attack(model, x, y, seed=1, **kw))
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y) + 0.1
    rob = mc.robust_evaluate(model, (x, y), mc.PGDConfig(**kw))
    assert rob.accuracy < mc.evaluate(model, (x, y)).accuracy
    assert not model.training


@pytest.mark.slow
def test_adversarial_training_is_more_robust(digits_splits):
    pgd = {"eps": 0.5, "step": 0.2, "steps": 3}
    init = mc.models.create("mlp", input_shape=(1, 8, 8), width=64, depth=1, seed=0)
    std = mc.train(init, digits_splits, epochs=10, progress=False)
    adv = mc.train(init, digits_splits, epochs=10, adversarial=pgd, progress=False)
    std_rob = mc.robust_evaluate(std.model, digits_splits.test, pgd).accuracy
    assert adv.metrics["robust_test_accuracy"] > std_rob + 0.1
    assert adv.config["adversarial"]["eps"] == 0.5


# --- accuracy with default settings (issue acceptance) -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "data", "threshold"),
    [("mlp", "mnist1d", 0.68), ("cnn1d", "mnist1d", 0.90), ("mlp", "digits", 0.95)],
)
def test_default_training_accuracy(model, data, threshold, mnist1d_splits, digits_splits):
    s = {"mnist1d": mnist1d_splits, "digits": digits_splits}[data]
    net = mc.models.create(model, input_shape=s.input_shape, num_classes=s.num_classes, seed=0)
    r = mc.train(net, s, progress=False)  # default epochs, lr, optimizer, schedule
    assert r.metrics["test_accuracy"] > threshold, r.metrics
