"""Optimizer and scheduler tables."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from lora_trainer.config import SCHEDULERS, TrainConfig
from lora_trainer.errors import UserError
from lora_trainer.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler, warmup_steps


def test_tables_cover_every_config_choice():
    from lora_trainer.config import OPTIMIZERS as CHOICES

    assert set(OPTIMIZERS) == set(CHOICES) and set(SCHEDULES) == set(SCHEDULERS)


def _available(name: str) -> bool:
    pkg = OPTIMIZERS[name].package
    return not pkg or importlib.util.find_spec(pkg) is not None


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_minimises_a_quadratic_or_names_its_package(name):
    w = torch.nn.Parameter(torch.full((4, 4), 2.0))
    lr = OPTIMIZERS[name].recommended_lr or 0.05
    cfg = TrainConfig(optimizer_type=name, learning_rate=lr)
    if not _available(name):
        with pytest.raises(UserError, match=f"pip install {OPTIMIZERS[name].package}"):
            build_optimizer(cfg, [{"params": [w], "lr": lr, "name": "unet"}])
        return
    opt = build_optimizer(cfg, [{"params": [w], "lr": lr, "name": "unet"}])
    start = float((w ** 2).sum().detach())
    for _ in range(60):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    # adaptive optimizers start from a tiny step size estimate and ramp up: any progress counts
    bound = start if OPTIMIZERS[name].recommended_lr else 0.9 * start
    assert float((w ** 2).sum().detach()) < bound


def test_prodigy_defaults_follow_the_diffusers_recommendation():
    spec = OPTIMIZERS["Prodigy"]
    assert spec.recommended_lr == 1.0
    assert spec.defaults == {"safeguard_warmup": True, "use_bias_correction": True, "betas": (0.9, 0.99),
                             "weight_decay": 0.01}


def test_unknown_optimizer_args_are_named():
    w = torch.nn.Parameter(torch.zeros(2))
    cfg = TrainConfig(optimizer_args=["weight_decay=0.1", "bogus=1"])
    with pytest.raises(UserError, match="does not take bogus"):
        build_optimizer(cfg, [{"params": [w], "lr": 1e-3, "name": "unet"}])
    opt = build_optimizer(TrainConfig(optimizer_args=["weight_decay=0.3", "betas=0.8,0.9"]),
                          [{"params": [w], "lr": 1e-3}])
    assert opt.param_groups[0]["weight_decay"] == 0.3 and opt.param_groups[0]["betas"] == (0.8, 0.9)


def lrs(name, total=100, warmup=0.0, cycles=1, power=1.0):
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = build_scheduler(TrainConfig(lr_scheduler=name, lr_warmup_steps=warmup, lr_scheduler_num_cycles=cycles,
                                        lr_scheduler_power=power), opt, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedule_shapes():
    assert lrs("constant") == [1.0] * 100
    assert lrs("constant", warmup=10) == [1.0] * 100  # kohya/diffusers: plain constant ignores warm-up
    w = lrs("constant_with_warmup", warmup=10)
    assert w[:10] == sorted(w[:10]) and w[0] < 0.2 and w[10:] == [1.0] * 90
    lin = lrs("linear")
    assert lin[0] == 1.0 and all(a > b for a, b in zip(lin, lin[1:])) and lin[-1] == pytest.approx(0.01)
    cos = lrs("cosine", warmup=0.1)
    assert max(cos) == pytest.approx(1.0) and cos[10] == pytest.approx(1.0) and cos[-1] < 0.01
    assert cos[55] == pytest.approx(0.5, abs=0.02)
    restarts = lrs("cosine_with_restarts", cycles=2)
    assert restarts[50] > 0.99 and restarts[49] < 0.01  # the second cycle starts again at the top
    poly = lrs("polynomial", power=2.0)
    assert poly[50] == pytest.approx(0.25, abs=0.01)


def test_warmup_ratio_or_count():
    assert warmup_steps(TrainConfig(lr_warmup_steps=0.1), 500) == 50
    assert warmup_steps(TrainConfig(lr_warmup_steps=20), 500) == 20
    assert math.isclose(lrs("linear", total=10, warmup=4)[0], 1 / 5)
