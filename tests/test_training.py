"""The trainer-side MaxEnt loss and KL (maxent_client.training) against a
plain per-group implementation written from the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maxent_client.training import (
    active_group_mask,
    constant_q_groups,
    controller_request_id,
    k3_kl,
    k3_kl_terms,
    listwise_maxent_loss,
    sequence_logprobs,
    token_logprobs,
)


def plain_loss(logp, weights, sizes, active, *, old=None, coef=0.0, low=0.2, high=0.2):
    """Per group: -sum w_i log softmax(l)_i (+ coef * clipped term), averaged over active groups."""
    total, clip_total, count, start = 0.0, 0.0, 0, 0
    for k, on in zip(sizes, active):
        group = slice(start, start + k)
        start += k
        if k == 0 or not on:
            continue
        count += 1
        ls, ws = logp[group], weights[group]
        peak = max(ls)
        lse = peak + math.log(sum(math.exp(x - peak) for x in ls))
        total += -sum(w * (x - lse) for w, x in zip(ws, ls))
        if coef > 0:
            for x, o, w in zip(ls, old[group], ws):
                a = w - 1.0 / k
                r = math.exp(min(max(x - o, -20.0), 20.0))
                clip_total += -min(r * a, min(max(r, 1 - low), 1 + high) * a)
    count = max(count, 1)
    return total / count + coef * clip_total / count


def weights_for(sizes, rng):
    return np.concatenate([rng.dirichlet(np.ones(k)) if k else np.zeros(0) for k in sizes]) if sizes else np.zeros(0)


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), max_size=6), seed=st.integers(0, 10**6), coef=st.sampled_from([0.0, 0.5]),
       high=st.sampled_from([None, 0.28]))
def test_loss_matches_the_plain_formula(sizes, seed, coef, high):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    logp = rng.normal(-20, 5, size=n)
    old = logp + rng.normal(0, 0.3, size=n)
    weights = weights_for(sizes, rng)
    active = rng.random(len(sizes)) < 0.8
    got = listwise_maxent_loss(torch.tensor(logp, requires_grad=True), weights, sizes, active_groups=active,
                               old_logp=old, clip_coef=coef, epsilon_low=0.2, epsilon_high=high)
    want = plain_loss(logp.tolist(), weights.tolist(), sizes, active.tolist(), old=old.tolist(), coef=coef,
                      high=0.2 if high is None else high)
    assert float(got.loss.detach()) == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert got.active_groups == sum(1 for k, on in zip(sizes, active) if k and on)


def test_gradient_is_softmax_minus_weights():
    """d L_g / d l_i = p_i - w_i for weights summing to 1: the policy moves toward w."""
    logp = torch.tensor([-3.0, -1.0, -2.0, -5.0, -4.0], dtype=torch.float64, requires_grad=True)
    weights = np.array([0.2, 0.5, 0.3, 0.9, 0.1])
    listwise_maxent_loss(logp, weights, [3, 2]).loss.backward()
    p = torch.cat([torch.softmax(logp[:3].detach(), 0), torch.softmax(logp[3:].detach(), 0)]).numpy()
    np.testing.assert_allclose(logp.grad.numpy(), (p - weights) / 2, atol=1e-12)  # mean over 2 groups


def test_weights_are_constants_and_no_active_group_keeps_the_graph():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    weights = torch.tensor([0.7, 0.3], requires_grad=True)
    parts = listwise_maxent_loss(logp, weights, [2], active_groups=[False])
    assert float(parts.loss.detach()) == 0.0 and parts.active_groups == 0
    parts.loss.backward()
    assert weights.grad is None and torch.all(logp.grad == 0)


def test_input_mistakes_are_named():
    logp = torch.zeros(3)
    with pytest.raises(ValueError, match="group_sizes add up to 2"):
        listwise_maxent_loss(logp, [0.5, 0.5, 0.0], [2])
    with pytest.raises(ValueError, match="weights has 2 entries"):
        listwise_maxent_loss(logp, [0.5, 0.5], [3])
    with pytest.raises(ValueError, match="old_logp"):
        listwise_maxent_loss(logp, [0.2, 0.3, 0.5], [3], clip_coef=0.1)
    with pytest.raises(ValueError, match="active_groups has 2 entries"):
        listwise_maxent_loss(logp, [0.2, 0.3, 0.5], [3], active_groups=[True, True])


def test_k3_kl_matches_the_plain_token_mean():
    rng = np.random.default_rng(3)
    ref, pol = rng.normal(-2, 1, size=(3, 5)), rng.normal(-2, 1, size=(3, 5))
    ref[0, 0] = -100.0  # d = -98 is clamped to -20
    mask = rng.random((3, 5)) < 0.7
    mask[0, 0] = True
    d = np.clip(ref - pol, -20, 20)
    want = float(np.sum((np.exp(d) - d - 1)[mask]) / mask.sum())
    assert k3_kl(torch.tensor(ref), torch.tensor(pol), torch.tensor(mask)) == pytest.approx(want, rel=1e-12)
    total, count = k3_kl_terms(torch.tensor(ref), torch.tensor(pol), torch.tensor(mask))
    assert count == int(mask.sum()) and total / count == pytest.approx(want, rel=1e-12)
    assert k3_kl(torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 2)) == 0.0


def test_sequence_and_token_logprobs():
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]])
    tokens = torch.tensor([[1, 0]])
    token = token_logprobs(logits, tokens)
    want = [1.0 - math.log(1 + math.e), 2.0 - math.log(1 + math.e ** 2)]
    np.testing.assert_allclose(token[0].numpy(), want, rtol=1e-6)
    mask = torch.tensor([[1, 0]])
    assert float(sequence_logprobs(token, mask)) == pytest.approx(want[0], rel=1e-6)
    full = torch.ones(1, 2)
    assert float(sequence_logprobs(token, full, length_normalize=True)) == pytest.approx(sum(want) / 2, rel=1e-6)


def test_constant_q_groups_and_active_mask():
    q = [0.5, 0.5, 0.2, 0.8, 1.0, 1 / 3, 1 / 3, 1 / 3 + 1e-9]
    sizes = [2, 2, 1, 0, 3]
    assert constant_q_groups(q, sizes).tolist() == [True, False, True, True, True]
    assert active_group_mask(sizes).tolist() == [True, True, True, False, True]
    assert active_group_mask(sizes, q_values=q, skip_zero_variance_groups=True).tolist() == [
        False, True, False, False, False]
    with pytest.raises(ValueError, match="needs q_values"):
        active_group_mask(sizes, skip_zero_variance_groups=True)


def test_request_ids_are_stable_and_bounded():
    assert controller_request_id("exp-1", "job-a", 7) == controller_request_id("exp-1", "job-a", 7) == "exp-1:job-a:7"
    assert controller_request_id("exp-1", "job-a", 8) != controller_request_id("exp-1", "job-b", 8)
    long = controller_request_id("r" * 128, "j" * 100, 3)
    assert len(long) <= 128 and long == controller_request_id("r" * 128, "j" * 100, 3)
    assert long != controller_request_id("r" * 128, "j" * 100, 4)
