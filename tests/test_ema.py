"""Moving averages (mimcli.ema): the update rule against a naive loop, frozen copies, and the
encoder EMA's warm-up schedule."""

import copy

import pytest
import torch
from torch import nn

from mimcli.ema import ema_decay, ema_update, momentum_copy


def test_ema_update_matches_a_naive_average_and_copies_buffers():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    old = copy.deepcopy(target)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(torch.randn(8, 4))  # moves the BatchNorm running stats
    ema_update(target, online, 0.9)
    for t, o, before in zip(
        target.parameters(), online.parameters(), old.parameters(), strict=True
    ):
        torch.testing.assert_close(t, 0.9 * before + 0.1 * o)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        assert torch.equal(t, o)


def test_ema_decay_warms_up_then_holds_the_given_decay():
    assert ema_decay(0, 0.9999) == 0.0
    assert ema_decay(7, 0.9999) == pytest.approx(1 - 8 ** (-2 / 3))
    assert ema_decay(10**9, 0.9999) == 0.9999
    values = [ema_decay(s, 0.99) for s in range(2000)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
