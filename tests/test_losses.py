"""The preference losses as pure functions: values a reader can check by hand, the definitions TRL uses
(the tree engine's parity with TRL's trainers on whole batches is in test_prefix_tree.py)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from agent_dpo.training import losses


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_sigmoid_at_equal_log_ratios_is_log_two():
    loss, chosen, rejected = losses.dpo_loss("sigmoid", _t(-5.0), _t(-7.0), _t(-5.0), _t(-7.0), 0.1,
                                             _t(3), _t(4))
    assert loss.item() == pytest.approx(math.log(2))
    assert chosen.item() == 0 and rejected.item() == 0


def test_sigmoid_hinge_ipo_and_norm_by_hand():
    pc, pr, rc, rr = _t(-10.0, -4.0), _t(-12.0, -3.0), _t(-11.0, -4.5), _t(-11.0, -3.5)
    lc, lr = _t(5, 2), _t(4, 2)
    beta = 0.5
    margin = (pc - rc) - (pr - rr)  # [2, 0]
    assert losses.dpo_loss("sigmoid", pc, pr, rc, rr, beta, lc, lr)[0].item() == pytest.approx(
        (-torch.nn.functional.logsigmoid(beta * margin)).mean().item())
    assert losses.dpo_loss("hinge", pc, pr, rc, rr, beta, lc, lr)[0].item() == pytest.approx(
        ((1 - beta * margin).clamp(min=0)).mean().item())
    per_token = (pc - rc) / lc - (pr - rr) / lr  # [1/5 + 1/4, 0.25 - 0.25]
    assert losses.dpo_loss("ipo", pc, pr, rc, rr, beta, lc, lr)[0].item() == pytest.approx(
        ((per_token - 1 / (2 * beta)) ** 2).mean().item())
    assert losses.dpo_loss("sigmoid_norm", pc, pr, rc, rr, beta, lc, lr)[0].item() == pytest.approx(
        (-torch.nn.functional.logsigmoid(beta * per_token)).mean().item())


def test_rewards_are_beta_times_log_ratios_and_carry_no_gradient():
    pc = _t(-3.0).requires_grad_()
    loss, chosen, rejected = losses.dpo_loss("sigmoid", pc, _t(-4.0), _t(-3.5), _t(-3.0), 0.2, _t(1), _t(1))
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.2)
    assert not chosen.requires_grad
    loss.backward()
    assert pc.grad.item() < 0  # raising the chosen log-prob lowers the loss


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        losses.dpo_loss("nope", _t(0), _t(0), _t(0), _t(0), 0.1, _t(1), _t(1))


def test_kto_reference_point_is_detached_and_never_negative():
    kl = losses.kto_kl(_t(-5.0, -6.0), _t(-4.0, -4.0))
    assert kl.item() == 0.0
    kl = losses.kto_kl(_t(-3.0, -2.0).requires_grad_(), _t(-4.0, -4.0))
    assert kl.item() == pytest.approx(1.5) and not kl.requires_grad


def test_kto_weights_each_class_with_its_own_term():
    policy, ref = _t(-2.0, -2.0), _t(-3.0, -3.0)  # log-ratio 1 for both
    desirable = torch.tensor([True, False])
    kl = _t(0.5)
    loss, rewards = losses.kto_loss(policy, ref, desirable, kl, 0.1, desirable_weight=2.0, undesirable_weight=0.5)
    want = (2.0 * (1 - torch.sigmoid(_t(0.1 * 0.5))) + 0.5 * (1 - torch.sigmoid(_t(0.1 * -0.5)))) / 2
    assert loss.item() == pytest.approx(want.item())
    assert rewards.tolist() == pytest.approx([0.1, 0.1])


def test_apo_zero_unpaired_and_sft():
    loss, _ = losses.apo_zero_unpaired_loss(_t(-1.0, -1.0), _t(-1.0, -1.0), torch.tensor([True, False]), 0.1)
    assert loss.item() == pytest.approx(0.5)
    assert losses.sft_loss(_t(-1.0, -3.0)).item() == pytest.approx(2.0)
