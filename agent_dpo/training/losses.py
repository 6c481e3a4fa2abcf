"""Preference losses as small pure functions over sequence log-probs, the same definitions TRL 1.16 uses
(DPOTrainer: sigmoid, hinge, ipo, sigmoid_norm; KTOTrainer: kto), so the prefix-tree engine and TRL
train the same objective. Each returns per-example losses; callers take the mean like TRL does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "sigmoid_norm")


def dpo_sigmoid(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta * (chosen - rejected log-ratio)): the original DPO loss."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def dpo_hinge(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """relu(1 - beta * margin): SLiC's hinge on the reward margin."""
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def dpo_ipo(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
            chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor) -> torch.Tensor:
    """IPO: squared distance of the per-token log-ratio margin from 1/(2 beta). TRL normalises the summed
    log-ratios by completion length, which the IPO authors confirmed is what their results use."""
    delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def dpo_sigmoid_norm(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
                     chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor) -> torch.Tensor:
    """Sigmoid loss on length-normalised log-ratios, so long completions do not dominate the margin."""
    delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return -F.logsigmoid(beta * delta)


def dpo_loss(loss_type: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
             chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss over the batch, and the detached implicit rewards beta * log-ratio for chosen and rejected."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = dpo_sigmoid(chosen, rejected, beta)
    elif loss_type == "hinge":
        losses = dpo_hinge(chosen, rejected, beta)
    elif loss_type == "ipo":
        losses = dpo_ipo(chosen, rejected, beta, chosen_lengths, rejected_lengths)
    elif loss_type == "sigmoid_norm":
        losses = dpo_sigmoid_norm(chosen, rejected, beta, chosen_lengths, rejected_lengths)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(DPO_LOSSES)}")
    return losses.mean(), beta * chosen.detach(), beta * rejected.detach()


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the batch mean of the mismatched-completion log-ratio, detached, clamped at 0."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Eq. 7 of the paper): desirable completions pay 1 - sigmoid(beta (r - kl)), undesirable ones
    1 - sigmoid(beta (kl - r)), weighted per class; the mean over the batch and the detached rewards."""
    logratios = policy_logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))),
    )
    return losses.mean(), beta * logratios.detach()


def apo_zero_unpaired_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
                           beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """APO-zero, unpaired (TRL's KTOTrainer loss_type="apo_zero_unpaired"): push desirable log-ratios up
    and undesirable ones down, with no KL reference point."""
    logratios = policy_logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * logratios)),
                         undesirable_weight * torch.sigmoid(beta * logratios))
    return losses.mean(), beta * logratios.detach()


def sft_loss(token_logps: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per completion token, averaged over all tokens of the batch."""
    return -token_logps.mean()
