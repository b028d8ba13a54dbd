import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mimcli import distributed
from mimcli.errors import MimcliError
from mimcli.heads import (
    HeadEnsemble,
    HeadWidths,
    IDHead,
    SyncBatchNorm1d,
    batch_norm,
    head_widths,
)
from mimcli.objectives.nna import nna_loss


@pytest.mark.parametrize(
    "embed_dim,expected",
    [
        (32, HeadWidths(256, 64, 512)),
        (128, HeadWidths(512, 128, 1024)),
        (384, HeadWidths(1536, 256, 3072)),
        (768, HeadWidths(2048, 256, 4096)),
        (1024, HeadWidths(2048, 256, 4096)),
    ],
)
def test_auto_widths(embed_dim, expected):
    assert head_widths(embed_dim) == expected
    assert head_widths(embed_dim, "auto") == expected


def test_explicit_widths_and_paper_costs():
    assert head_widths(32, 100) == HeadWidths(100, 100, 200)
    assert head_widths(32, 512) == HeadWidths(512, 256, 1024)
    assert head_widths(32, "64") == HeadWidths(64, 64, 128)
    assert head_widths(32, "paper") == HeadWidths(2048, 256, 4096)
    # The paper heads cost ~7M multiply-adds per sample even on a width-32 encoder; auto ~0.16M.
    assert head_widths(32, "paper").macs(32) == 6_881_280
    assert head_widths(32).macs(32) == 155_648


@pytest.mark.parametrize("spec", [7, 0, -3, "7", "big", "", "auto2", True, 3.5])
def test_bad_width_spec_raises(spec):
    with pytest.raises(MimcliError):
        head_widths(128, spec)


def _types(seq):
    return [type(m) for m in seq]


def test_head_layer_structure():
    head = IDHead(32, HeadWidths(48, 24, 96))
    L, BN, G = nn.Linear, nn.BatchNorm1d, nn.GELU
    assert _types(head.projector) == [L, BN, G, L, BN, G, L, BN]
    assert _types(head.predictor) == [L, BN, G, L, BN]
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [
        (48, 32),
        (48, 48),
        (24, 48),
        (96, 24),
        (24, 96),
    ]
    assert all(m.bias is None for m in linears)
    bns = [m.num_features for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    assert bns == [48, 48, 24, 96, 24]

    mae_ct = IDHead(32, HeadWidths(48, 24, 96), act="relu", predictor_final_bn=False)
    assert _types(mae_ct.projector) == [L, BN, nn.ReLU, L, BN, nn.ReLU, L, BN]
    assert _types(mae_ct.predictor) == [L, BN, nn.ReLU, L]
    with pytest.raises(MimcliError, match="activation"):
        IDHead(32, HeadWidths(48, 24, 96), act="silu")


def test_head_forward_shapes_and_projection():
    torch.manual_seed(0)
    head = IDHead(32, head_widths(32))
    x = torch.randn(10, 32)
    z, p = head(x)
    assert z.shape == p.shape == (10, 64)
    head.eval()
    z, p = head(x)
    torch.testing.assert_close(head.project(x), z)
    torch.testing.assert_close(head.predictor(z), p)
    assert not torch.allclose(z, p)


def test_every_head_parameter_gets_a_gradient():
    torch.manual_seed(0)
    ensemble = HeadEnsemble([3, 4], in_dim=32, widths=head_widths(32, 16))
    feats = {3: torch.randn(12, 32), 4: torch.randn(12, 32), 1: torch.randn(12, 32)}
    out = ensemble(feats)
    assert sorted(out) == [3, 4]
    loss = sum(nna_loss(z, z.roll(1, 0), p, 0.2) for z, p in out.values())
    loss.backward()
    for name, param in ensemble.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_ensemble_keys_and_errors():
    ensemble = HeadEnsemble([24, 17], in_dim=8, widths=HeadWidths(16, 8, 32))
    assert ensemble.blocks == [17, 24]
    assert list(ensemble.heads.keys()) == ["17", "24"]
    assert ensemble.head(24) is ensemble.heads["24"]
    assert "heads.17.projector.0.weight" in ensemble.state_dict()
    with pytest.raises(KeyError, match="24"):
        ensemble({17: torch.randn(4, 8)})
    for blocks in ([], [3, 3], [0, 1]):
        with pytest.raises(MimcliError):
            HeadEnsemble(blocks, in_dim=8, widths=HeadWidths(16, 8, 32))


def test_batch_norm_factory(monkeypatch):
    assert type(batch_norm(8)) is nn.BatchNorm1d
    assert batch_norm(8, affine=False).weight is None
    assert type(batch_norm(8, sync=True)) is SyncBatchNorm1d
    assert all(
        type(m) is SyncBatchNorm1d
        for m in IDHead(8, HeadWidths(16, 8, 32), sync_bn=True).modules()
        if isinstance(m, nn.BatchNorm1d)
    )
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "nccl")
    assert type(batch_norm(8, sync=True)) is nn.SyncBatchNorm
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "gloo")
    assert type(batch_norm(8, sync=True)) is SyncBatchNorm1d


def _set_affine(bn, seed):
    gen = torch.Generator().manual_seed(seed)
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(1 + 0.5 * torch.randn(bn.num_features, generator=gen))
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen))


@pytest.mark.parametrize("momentum,affine", [(0.1, True), (None, True), (0.3, False)])
def test_sync_batch_norm_equals_batch_norm_in_one_process(momentum, affine):
    ref = nn.BatchNorm1d(6, momentum=momentum, affine=affine)
    _set_affine(ref, 1)
    sync = SyncBatchNorm1d(6, momentum=momentum, affine=affine)
    sync.load_state_dict(ref.state_dict())
    assert list(sync.state_dict()) == list(ref.state_dict())
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(10, 6, generator=gen) * 3 + 1
        upstream = torch.randn(10, 6, generator=gen)
        outs = []
        for bn in (ref, sync):
            xi = x.clone().requires_grad_()
            y = bn(xi)
            (y * upstream).sum().backward()
            outs.append((y, xi.grad))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
    if affine:
        torch.testing.assert_close(ref.weight.grad, sync.weight.grad, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ref.bias.grad, sync.bias.grad, atol=1e-6, rtol=1e-6)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[key], value, atol=1e-6, rtol=1e-6)
    assert int(sync.num_batches_tracked) == 3
    ref.eval()
    sync.eval()
    x = torch.randn(4, 6, generator=gen)
    torch.testing.assert_close(ref(x), sync(x))


# --- two-process gloo test ---------------------------------------------------------------------

CHANNELS = 5
# name -> (rows on rank 0, rows on rank 1, momentum, input shape after the batch dimension)
DIST_CASES = {
    "even": (6, 6, 0.1, (CHANNELS,)),
    "uneven_cumulative": (5, 3, None, (CHANNELS,)),
    "sequence": (3, 3, 0.2, (CHANNELS, 4)),
}
DIST_STEPS = 2


def _dist_case_data(name):
    """Global batches and upstream gradients for each step, identical on every process."""
    rows0, rows1, _, shape = DIST_CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    steps = []
    for _ in range(DIST_STEPS):
        x = torch.randn(rows0 + rows1, *shape, generator=gen) * 2 + 0.5
        steps.append((x, torch.randn(x.shape, generator=gen)))
    return steps, torch.randn(4, *shape, generator=gen)


def _run_bn(bn, name, rows):
    """Train steps then an eval pass on ``rows`` of each global batch; returns every tensor."""
    steps, eval_x = _dist_case_data(name)
    record = {"y": [], "x_grad": [], "w_grad": [], "b_grad": []}
    for x_full, upstream in steps:
        x = x_full[rows].clone().requires_grad_()
        y = bn(x)
        (y * upstream[rows]).sum().backward()
        record["y"].append(y.detach())
        record["x_grad"].append(x.grad)
        record["w_grad"].append(bn.weight.grad.clone())
        record["b_grad"].append(bn.bias.grad.clone())
        bn.weight.grad = bn.bias.grad = None
    record["state"] = {k: v.clone() for k, v in bn.state_dict().items()}
    bn.eval()
    record["eval_y"] = bn(eval_x).detach()
    return record


def _new_bn(cls, name):
    bn = cls(CHANNELS, momentum=DIST_CASES[name][2])
    _set_affine(bn, 7)
    return bn


def _dist_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results = {}
        for name, (rows0, rows1, _, _) in DIST_CASES.items():
            rows = slice(0, rows0) if rank == 0 else slice(rows0, rows0 + rows1)
            results[name] = _run_bn(_new_bn(SyncBatchNorm1d, name), name, rows)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_sync_batch_norm_two_gloo_processes_equal_full_batch(tmp_path, monkeypatch):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only, no network needed
    ctx = mp.start_processes(
        _dist_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 100
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the two gloo processes did not finish in time")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    close = dict(atol=1e-6, rtol=1e-5)
    for name, (rows0, rows1, _, _) in DIST_CASES.items():
        ref = _run_bn(_new_bn(nn.BatchNorm1d, name), name, slice(0, rows0 + rows1))
        halves = (slice(0, rows0), slice(rows0, rows0 + rows1))
        for r, part in enumerate(ranks):
            got = part[name]
            for step in range(DIST_STEPS):
                torch.testing.assert_close(got["y"][step], ref["y"][step][halves[r]], **close)
                torch.testing.assert_close(
                    got["x_grad"][step], ref["x_grad"][step][halves[r]], **close
                )
            for key, value in ref["state"].items():
                torch.testing.assert_close(got["state"][key], value, **close)
            torch.testing.assert_close(got["eval_y"], ref["eval_y"], **close)
        for step in range(DIST_STEPS):
            for key in ("w_grad", "b_grad"):
                summed = ranks[0][name][key][step] + ranks[1][name][key][step]
                torch.testing.assert_close(summed, ref[key][step], **close)
                # each rank alone holds only its share: the sum is what DDP reduces
                assert not torch.allclose(ranks[0][name][key][step], ref[key][step], atol=1e-3)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_heads_start_with_the_official_initialisation(act):
    """Xavier-uniform Linear weights (bound sqrt(6 / (fan_in + fan_out)), variance bound^2 / 3);
    BatchNorm weight 1, bias 0 (METHOD §1.1). torch's default Linear init (kaiming-uniform with
    a = sqrt(5): bound 1 / sqrt(fan_in)) fails the variance check for these shapes."""
    torch.manual_seed(0)
    head = IDHead(64, HeadWidths(hidden=256, out=32, predictor_hidden=128), act=act)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 5
    for linear in linears:
        fan_out, fan_in = linear.weight.shape
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        w = linear.weight.detach()
        assert w.abs().max() <= bound
        assert w.abs().max() > 0.95 * bound  # the whole range is used
        assert w.var().item() == pytest.approx(bound**2 / 3, rel=0.1)
        assert linear.bias is None
    norms = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)
