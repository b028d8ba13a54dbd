import math

import pytest
import torch

from mimcli.objectives.nna import alignment, multiview_loss, nna_loss, nnclr_loss


def _naive_loss(z, nn, p_all, tau, offset, kind):
    """Per-sample reference: normalise, build each row's logits by hand, -log softmax at the
    positive, averaged over rows (float64)."""
    z, nn, p_all = (t.detach().double() for t in (z, nn, p_all))
    z = [v / v.norm() for v in z]
    nn = [v / v.norm() for v in nn]
    p = [v / v.norm() for v in p_all]
    total = 0.0
    for i in range(len(z)):
        row = []
        for j in range(len(p)):
            use_neighbour = kind == "nnclr" or j == offset + i
            query = nn[i] if use_neighbour else z[i]
            row.append(float(query @ p[j]) / tau)
        top = max(row)
        log_sum = top + math.log(sum(math.exp(r - top) for r in row))
        total += log_sum - row[offset + i]
    return total / len(z)


def _inputs(batch, total, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=gen)
    nn = z + 0.5 * torch.randn(batch, dim, generator=gen)
    p_all = torch.randn(total, dim, generator=gen) * 3.0
    return z, nn, p_all


# (B, M, offset): single process, and both ranks of a 2-rank gathered batch.
CASES = [(8, 8, 0), (6, 12, 0), (6, 12, 6), (5, 15, 5)]


@pytest.mark.parametrize("batch,total,offset", CASES)
@pytest.mark.parametrize("kind,loss_fn", [("nna", nna_loss), ("nnclr", nnclr_loss)])
def test_loss_matches_naive_reference(batch, total, offset, kind, loss_fn):
    z, nn, p_all = _inputs(batch, total, seed=batch + offset)
    tau = 0.2
    got = loss_fn(z, nn, p_all, tau, offset)
    expected = _naive_loss(z, nn, p_all, tau, offset, kind)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(got.item() - expected) < 1e-6 * max(1.0, abs(expected))


def test_neighbour_swap_on_the_positive_matters():
    z, nn, p_all = _inputs(8, 16)
    a = nna_loss(z, nn, p_all, 0.3)
    b = nnclr_loss(z, nn, p_all, 0.3)
    assert abs(a.item() - b.item()) > 1e-2
    # With the sample itself as its neighbour both reduce to the same InfoNCE.
    torch.testing.assert_close(nna_loss(z, z, p_all, 0.3), nnclr_loss(z, z, p_all, 0.3))


def test_offset_picks_this_ranks_positives():
    z, nn, p_all = _inputs(6, 12)
    # Rank 1's predictions sit at rows 6..11; moving them to rows 0..5 with offset 0 is the same.
    swapped = torch.cat([p_all[6:], p_all[:6]])
    torch.testing.assert_close(nna_loss(z, nn, p_all, 0.2, 6), nna_loss(z, nn, swapped, 0.2, 0))
    assert abs(nna_loss(z, nn, p_all, 0.2, 6).item() - nna_loss(z, nn, p_all, 0.2, 0).item()) > 1e-3


@pytest.mark.parametrize("loss_fn", [nna_loss, nnclr_loss])
def test_gradient_flows_only_through_predictions(loss_fn):
    z, nn, p_all = (t.clone().requires_grad_() for t in _inputs(6, 12))
    loss_fn(z, nn, p_all, 0.2, 6).backward()
    assert z.grad is None and nn.grad is None
    assert p_all.grad is not None and p_all.grad.abs().sum() > 0
    # Negatives of the other rank's rows get gradient too (in-batch negatives).
    assert p_all.grad[:6].abs().sum() > 0


@pytest.mark.parametrize("kind,loss_fn", [("nna", nna_loss), ("nnclr", nnclr_loss)])
@pytest.mark.parametrize("num_local", [0, 2])
def test_multiview_loss_is_mean_of_intended_pairs(kind, loss_fn, num_local):
    gen = torch.Generator().manual_seed(num_local)
    batch, total, dim, offset, tau = 4, 8, 16, 4, 0.25
    z = [torch.randn(batch, dim, generator=gen) for _ in range(2)]
    nn = [zi + 0.3 * torch.randn(batch, dim, generator=gen) for zi in z]
    p = [torch.randn(total, dim, generator=gen) for _ in range(2 + num_local)]
    loss, count = multiview_loss(z, nn, p, tau, offset, kind=kind)
    pairs = [(0, 1), (1, 0)] + [(a, 2 + v) for a in (0, 1) for v in range(num_local)]
    terms = [loss_fn(z[a], nn[a], p[b], tau, offset) for a, b in pairs]
    assert count == 2 + 2 * num_local == len(terms)
    torch.testing.assert_close(loss, sum(terms) / len(terms))
    if num_local:
        # A target paired with its own view's prediction is not a term.
        own = loss_fn(z[0], nn[0], p[0], tau, offset)
        assert abs(loss.item() - (sum(terms) + own).item() / (len(terms) + 1)) > 1e-4


def test_multiview_loss_rejects_bad_arguments():
    z = [torch.randn(2, 4)] * 2
    with pytest.raises(ValueError, match="kind"):
        multiview_loss(z, z, z, 0.2, kind="byol")
    with pytest.raises(ValueError, match="2 global"):
        multiview_loss(z[:1], z, z, 0.2)
    with pytest.raises(ValueError, match="offset"):
        nna_loss(z[0], z[0], z[0], 0.2, offset=1)
    with pytest.raises(ValueError, match="temperature"):
        nna_loss(z[0], z[0], z[0], 0.0)


def test_starts_near_log_batch_for_unrelated_inputs():
    gen = torch.Generator().manual_seed(3)
    batch, dim = 512, 256
    z, nn, p = (torch.randn(batch, dim, generator=gen) for _ in range(3))
    for loss_fn in (nna_loss, nnclr_loss):
        loss = loss_fn(z, nn, p, 0.2).item()
        assert abs(loss - math.log(batch)) < 0.2, loss


def test_loss_falls_when_training_a_predictor():
    torch.manual_seed(0)
    batch, dim = 32, 16
    z = torch.randn(batch, dim)
    nn = z + 0.3 * torch.randn(batch, dim)
    predictor = torch.nn.Sequential(
        torch.nn.Linear(dim, 64), torch.nn.GELU(), torch.nn.Linear(64, dim)
    )
    opt = torch.optim.Adam(predictor.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        loss = nna_loss(z, nn, predictor(z), tau=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.7 * math.log(batch)
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_alignment_is_mean_cosine_of_matched_rows():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[3.0, 0.0], [1.0, 0.0]], requires_grad=True)
    value = alignment(z, p)
    assert value.item() == pytest.approx(0.5)
    assert not value.requires_grad
