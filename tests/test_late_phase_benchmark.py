"""benchmarks/late_phase.py: its ablations switch off what they say they switch off."""

import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "late_phase.py"
_spec = importlib.util.spec_from_file_location("late_phase", _PATH)
lp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lp)


def _one_step(variant: dict, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = lp.make_optimizer(model, variant)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b) -> bool:
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a, b))


def test_every_output_off_is_adam_at_the_base_lr():
    # the untrained rule is Adam: with every metanetwork output zeroed by the hook, so is this one
    # (the shipped late phase, fade from step 30 and lr decay from step 100, starts after these steps)
    assert _same(_one_step({"zero": tuple(range(7))}), _one_step(lp.VARIANTS["Adam at the base lr"]))


def test_ablations_change_the_shipped_update():
    shipped = _one_step(lp.VARIANTS["shipped default"])
    late_off = _one_step(lp.VARIANTS["late phase off"])
    for label in ("late phase off, additive terms off (max_mix=0)", "late phase off, parameter term off",
                  "late phase off, gradient term off"):
        assert not _same(_one_step(lp.VARIANTS[label]), late_off), label
    assert not _same(_one_step(lp.VARIANTS["Adam at the base lr, amsgrad"]), shipped)


def test_late_phase_variants_switch_off_what_they_say():
    keys = ("mix_decay_from", "amsgrad_from", "lr_decay_from")
    full = lp.make_optimizer(torch.nn.Linear(2, 2), lp.VARIANTS["shipped default"]).learned.config
    assert full.mix_decay_from and full.lr_decay_from and full.amsgrad_from  # the shipped default has a late phase
    for label, on in (("late phase off", set()),
                      ("late phase without AMSGrad (the default before 2026-12-05)", {"mix_decay_from", "lr_decay_from"}),
                      ("late phase: additive terms fade, no lr decay", {"mix_decay_from"}),
                      ("late phase: lr decay, no fade", {"lr_decay_from"}),
                      ("late phase: fade + AMSGrad from 100, no lr decay", {"mix_decay_from", "amsgrad_from"})):
        config = lp.make_optimizer(torch.nn.Linear(2, 2), lp.VARIANTS[label]).learned.config
        assert {k for k in keys if getattr(config, k) is not None} == on, label
