"""Losses over a process group (metricloss_kernels/distributed.py) against one process on the concatenated batch.

Each test starts one world of spawned processes (gloo on 127.0.0.1, a hard timeout: a hang fails the test) and
batches many checks into it, since a process start costs seconds. The truth is the reference backend in one process
on X = cat_r x_r, Y = cat_r y_r with the concatenated proxies; a sharded call must give, in float64 to rel 1e-9,
the same value on every rank, each rank's proxies exactly their rows of the single-process gradient, and each rank's
embeddings W x the single-process gradient of its rows (the DDP convention).
"""
import datetime
import faulthandler
import itertools
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import metricloss_kernels as mlk
from metricloss_kernels import distributed
from metricloss_kernels import functional as F
from utils import assert_close

TIMEOUT_S = 150  # per world; the checks of a world take a few seconds
RTOL = 1e-9
N_LOCAL, C, K, D = 7, 53, 3, 12  # C divisible by neither 2 nor 3


# ------------------------------------------------------------------------------------------------- the worlds
def _entry(rank, world, port, fn, args):
    # A crash (a fatal signal) or a hang prints every thread's stack (pytest shows the ranks' stderr); a hang ends
    # the rank before the parent's deadline, so that a failure says where it was.
    faulthandler.enable()
    faulthandler.dump_traceback_later(TIMEOUT_S - 20, exit=True)
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


class WorldCrashed(Exception):
    """A rank of a world died without a Python exception (a fatal signal, or ended by its hang watchdog), or the
    world outlived TIMEOUT_S."""


def _run_world_once(fn, world, args):
    """One world of `world` spawned ranks running fn. The group's store is held here, listening on a port the OS
    picks (port 0) and given to the ranks: no port is released and then re-bound, which a concurrent process could
    take in between."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    context = mp.start_processes(_entry, args=(world, store.port, fn, args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise WorldCrashed(f"a world of {world} ranks did not finish within {TIMEOUT_S} s (a hang?)")
    except mp.ProcessExitedException as e:  # (a Python exception in a rank is ProcessRaisedException: not caught)
        raise WorldCrashed(str(e)) from e
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        del store


def run_world(fn, world, *args):
    """fn(rank, world, *args) in `world` spawned processes of one gloo group; an assertion or any exception in a
    rank fails the test at once.

    A rank that crashes or hangs gets one more world, with a warning that the test summary shows, and fails the test
    the second time: fresh-clone runs of this suite saw one hang (session 5) and one heap-corruption abort
    ("malloc(): unaligned tcache chunk detected", rank 0, world of 2) among a few dozen worlds, never twice in a row
    and never reproduced in a loop; the ranks' stacks, which faulthandler prints, are in the captured stderr."""
    try:
        return _run_world_once(fn, world, args)
    except WorldCrashed as crash:
        warnings.warn(f"a world of {world} ranks crashed or hung ({crash}); running it once more", stacklevel=2)
    try:
        return _run_world_once(fn, world, args)
    except WorldCrashed as crash:
        raise AssertionError(f"a world of {world} ranks crashed or hung twice: {crash}") from crash


# ------------------------------------------------------------------------------------------------ the cases
PROXY_CASES = [  # (functional name, keyword arguments, centers per class)
    ("proxy_nca_loss", {}, 1),
    ("proxy_nca_loss", dict(exclude_positive=False), 1),
    ("proxy_anchor_loss", {}, 1),
    ("soft_triple_loss", dict(centers_per_class=K), K),
    ("mpa_loss", dict(centers_per_class=K, variant="mpa"), K),
    ("mpa_loss", dict(centers_per_class=K, variant="dw"), K),
    ("mpa_loss", dict(centers_per_class=K, variant="ap"), K),
    ("arcface_loss", {}, 1),
    ("sub_center_arcface_loss", dict(sub_centers=K), K),
    ("cosface_loss", {}, 1),
    ("l2_softmax_loss", dict(bias=True), 1),
    ("l2_softmax_loss", dict(normalize_weights=True), 1),
    ("regular_polytope_loss", dict(num_classes=C), 1),
    ("proxy_repel_loss", dict(variant="proxies"), 1),
    ("proxy_repel_loss", dict(variant="batch"), 1),
]


def _batch(world, seed, absent_rank=None):
    """(X [W n, D], Y [W n], W [C K, D], bias [C]) in float64; with `absent_rank`, no label of the batch belongs to
    that rank's classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * N_LOCAL, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (world * N_LOCAL,), generator=g)
    if absent_rank is not None:
        start, stop = distributed.class_range(C, absent_rank, world)
        y = torch.where((y >= start) & (y < stop), (y + (stop - start)) % C, y)
        assert not ((y >= start) & (y < stop)).any()
    w = torch.randn(C * K, D, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    return x, y, w, bias


def _call(name, kwargs, x, y, w, bias, **extra):
    """The loss and the gradients of its leaves: (value, [dx, dproxies, dbias...])."""
    kwargs = dict(kwargs)
    x = x.clone().requires_grad_()
    leaves = [x]
    if name == "regular_polytope_loss":
        value = getattr(F, name)(x, y, **kwargs, **extra)
    else:
        w = w.clone().requires_grad_()
        leaves.append(w)
        if kwargs.pop("bias", False):
            kwargs["bias"] = bias.clone().requires_grad_()
            leaves.append(kwargs["bias"])
        value = getattr(F, name)(x, y, w, **kwargs, **extra)
    value.backward()
    return value.detach(), [t.grad for t in leaves]


def _check_proxy_losses(rank, world, group):
    """Every proxy loss on both CPU backends, with random labels and with a rank none of whose classes is in the
    batch."""
    start, stop = distributed.class_range(C, rank, world)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    for seed, absent in ((0, None), (1, world - 1)):
        x, y, w, bias = _batch(world, seed, absent)
        for name, kwargs, k in PROXY_CASES:
            xc = x
            if name == "regular_polytope_loss":  # a simplex of C classes lives in C - 1 dimensions
                xc = torch.randn(world * N_LOCAL, C - 1, generator=torch.Generator().manual_seed(seed),
                                 dtype=torch.float64)
            full = w[:C * k]
            truth, truth_grads = _call(name, kwargs, xc, y, full, bias, backend="reference")
            for backend in ("reference", "chunked"):
                what = f"{name} {kwargs} {backend} rank {rank}/{world} seed {seed}"
                value, grads = _call(name, kwargs, xc[rows], y[rows], full[start * k:stop * k], bias[start:stop],
                                     backend=backend, process_group=group)
                assert_close(value, truth, RTOL, what + ": value")
                assert_close(grads[0], world * truth_grads[0][rows], RTOL, what + ": embeddings' gradient")
                for got, expected in zip(grads[1:], truth_grads[1:]):
                    per_class = expected.shape[0] // C
                    assert_close(got, expected[start * per_class:stop * per_class], RTOL, what + ": shard gradient")


def _check_sampling(rank, world, group):
    """sample_rate < 1 over a process group: the single-process loss on the union of the ranks' sampled classes
    (each rank's sample redrawn here from the same seed); the proxies' gradient exact on this rank's rows, zero on
    the classes it left out."""
    rate, seed, n = 0.5, 7, 4  # few rows: the sample (at least the N rows' worth of classes) is below C_r
    x, y, w, _ = _batch(world, 8)
    x, y, w = x[:world * n], y[:world * n], w[:C]
    start, stop = distributed.class_range(C, rank, world)
    rows = slice(rank * n, (rank + 1) * n)
    kept, local = [], torch.full_like(y, -1)
    for r in range(world):  # rank r's draw, as it makes it
        lo, hi = distributed.class_range(C, r, world)
        torch.manual_seed(seed)
        index, position = distributed.sample_classes(y - lo, hi - lo, distributed.sample_size(hi - lo, rate, len(y)))
        local = torch.where(position >= 0, position + sum(len(k) for k in kept), local)
        kept.append(index + lo)
    kept = torch.cat(kept)
    assert len(kept) < C
    truth, truth_grads = _call("cosface_loss", {}, x, local, w[kept], None, backend="reference")
    torch.manual_seed(seed)
    value, grads = _call("cosface_loss", {}, x[rows], y[rows], w[start:stop], None, backend="chunked",
                         process_group=group, sample_rate=rate)
    assert_close(value, truth, RTOL, f"rank {rank}: sampled value")
    assert_close(grads[0], world * truth_grads[0][rows], RTOL, f"rank {rank}: sampled embeddings' gradient")
    expected = torch.zeros(C, D, dtype=torch.float64)
    expected[kept] = truth_grads[1]
    assert_close(grads[1], expected[start:stop], RTOL, f"rank {rank}: sampled proxies' gradient")


def _check_errors(rank, world, group):
    """Bad input on one rank: a clear ValueError on every rank, and the group is usable afterwards."""
    start, stop = distributed.class_range(C, rank, world)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    x, y, w, _ = _batch(world, 2)
    x, y, w = x[rows], y[rows], w[:C][start:stop]
    with pytest.raises(ValueError, match="num_classes must be at least the number of ranks"):
        mlk.ArcFaceLoss(world - 1, D, process_group=group)
    # A rank without classes (fewer classes than ranks, split by hand).
    empty = w[:0] if rank == 1 else w
    # (the failing rank raises its own error, the others quote it)
    with pytest.raises(ValueError, match="weight has no row on this rank"):
        F.cosface_loss(x, y, empty, process_group=group)
    # A label out of range on one rank only.
    bad = y.clone()
    if rank == world - 1:
        bad[0] = C
    with pytest.raises(ValueError, match=rf"labels must be in \[0, C\) on every rank.*{C}"):
        F.arcface_loss(x, bad, w, process_group=group)
    with pytest.raises(ValueError, match="labels must be >= 0"):
        F.contrastive_loss(x, torch.where(torch.tensor(rank == 0), -bad, bad), process_group=group)
    # Different local batch sizes.
    with pytest.raises(ValueError, match="same number of rows"):
        F.proxy_anchor_loss(x[:N_LOCAL - (rank == 0)], y[:N_LOCAL - (rank == 0)], w, process_group=group)
    # A bad argument on one rank only (checked locally, announced to the others).
    with pytest.raises(ValueError, match="scale"):
        F.cosface_loss(x, y, w, scale=-1.0 if rank == 0 else 64.0, process_group=group)
    with pytest.raises(TypeError, match="process_group must be"):
        F.cosface_loss(x, y, w, process_group="world")
    full_x, full_y, full_w, _ = _batch(world, 2)  # still in step: the value of one process
    assert_close(F.cosface_loss(x, y, w, process_group=group), F.cosface_loss(full_x, full_y, full_w[:C]), RTOL)


PAIR_CASES = [  # (functional name, keyword arguments)
    ("contrastive_loss", {}),
    ("triplet_margin_loss", dict(mining="all")),
    ("triplet_margin_loss", dict(mining="semi-hard", distance="euclidean")),
    ("triplet_margin_loss", dict(mining="hard", distance="squared_euclidean")),
    ("lifted_structure_loss", {}),
    ("npairs_loss", {}),
    ("margin_loss", dict(generator=True)),
    ("margin_loss", dict(beta="per class")),
    ("multi_similarity_loss", {}),
    ("exponential_triplet_loss", dict(num_classes=C)),
    ("center_loss", dict(centers=True)),
]
PAIR_CLASSES = 4  # few classes, so that every anchor has positives


def _check_pair_losses(rank, world, group):
    """Every pair loss: the value of one process on the concatenated batch, embeddings' gradients x W, a learnable
    (replicated) beta the whole single-process gradient."""
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    x, y, w, _ = _batch(world, 3)
    y = y % PAIR_CLASSES
    for name, kwargs in PAIR_CASES:
        def call(x, y, **extra):
            args = dict(kwargs)
            x = x.clone().requires_grad_()
            leaves = [x]
            torch.manual_seed(5)  # MarginLoss's draws: every rank's RNG in the state of the single process's
            if args.get("generator"):
                args["generator"] = torch.Generator().manual_seed(5)
            if args.get("beta") == "per class":
                args["beta"] = torch.full((PAIR_CLASSES,), 1.2, dtype=x.dtype, requires_grad=True)
                leaves.append(args["beta"])
            if args.get("centers"):
                args["centers"] = w[:PAIR_CLASSES]
            value = getattr(F, name)(x, y, **args, **extra)
            value.backward()
            return value.detach(), [t.grad for t in leaves]

        what = f"{name} {kwargs} rank {rank}/{world}"
        truth, truth_grads = call(x, y)
        value, grads = call(x[rows], y[rows], process_group=group)
        assert_close(value, truth, RTOL, what + ": value")
        assert_close(grads[0], world * truth_grads[0][rows], RTOL, what + ": embeddings' gradient")
        for got, expected in zip(grads[1:], truth_grads[1:]):
            assert_close(got, expected, RTOL, what + ": replicated parameter's gradient")

    # With a reference: each rank passes its rows of it (and ref_self indexes them); the reference's gradient
    # follows the embeddings' convention. Every one also through backend "chunked" (streamed).
    r, ry, _, _ = _batch(world, 4)
    ry = ry % PAIR_CLASSES
    own = torch.randint(-1, N_LOCAL, (world * N_LOCAL,), generator=torch.Generator().manual_seed(6))
    global_own = torch.where(own >= 0, own + torch.arange(world).repeat_interleave(N_LOCAL) * N_LOCAL, own)
    cases = [(n, k) for n, k in PAIR_CASES if n != "center_loss"]
    cases += [(n, dict(k, backend="chunked")) for n, k in cases]
    for (name, kwargs), with_own in itertools.product(cases, (False, True)):
        def call(x, y, r, ry, ref_self, **extra):
            args = dict(kwargs)
            x, r = x.clone().requires_grad_(), r.clone().requires_grad_()
            torch.manual_seed(5)
            if args.get("generator"):
                args["generator"] = torch.Generator().manual_seed(5)
            if args.get("beta") == "per class":
                args["beta"] = torch.full((PAIR_CLASSES,), 1.2, dtype=x.dtype)
            value = getattr(F, name)(x, y, **args, ref_emb=r, ref_labels=ry,
                                     ref_self=ref_self if with_own else None, **extra)
            value.backward()
            return value.detach(), x.grad, r.grad

        what = f"{name} {kwargs} with a reference{' and ref_self' if with_own else ''}, rank {rank}/{world}"
        truth = call(x, y, r, ry, global_own)
        got = call(x[rows], y[rows], r[rows], ry[rows], own[rows], process_group=group)
        assert_close(got[0], truth[0], RTOL, what + ": value")
        assert_close(got[1], world * truth[1][rows], RTOL, what + ": embeddings' gradient")
        assert_close(got[2], world * truth[2][rows], RTOL, what + ": reference's gradient")

    # CrossBatchMemory: a ring of 2 local batches per rank holds the rows that one ring of 2 whole batches holds.
    single = mlk.CrossBatchMemory(mlk.ContrastiveLoss(), D, memory_size=2 * world * N_LOCAL)
    sharded = mlk.CrossBatchMemory(mlk.ContrastiveLoss(process_group=group), D, memory_size=2 * N_LOCAL)
    for step in range(3):
        x, y, _, _ = _batch(world, 10 + step)
        y = y % PAIR_CLASSES
        assert_close(sharded(x[rows], y[rows]), single(x, y), RTOL, f"rank {rank}: CrossBatchMemory, step {step}")

    # CenterLoss in training mode: replicated centres move by the whole batch's means, as in one process.
    x = x.float()
    torch.manual_seed(9)
    single = mlk.CenterLoss(PAIR_CLASSES, D)
    torch.manual_seed(9)
    sharded = mlk.CenterLoss(PAIR_CLASSES, D, process_group=group)
    for _ in range(2):
        assert_close(sharded(x[rows], y[rows]), single(x, y), 1e-6, f"rank {rank}: CenterLoss value")
        assert_close(sharded.centers, single.centers, 1e-6, f"rank {rank}: CenterLoss centres")


def _check_ddp_backbone(rank, world, group):
    """A DistributedDataParallel backbone under a sharded loss receives exactly the single-process gradient."""
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    x, y, _, _ = _batch(world, 4)
    torch.manual_seed(0)  # the same backbone and full module on every rank
    backbone = torch.nn.Linear(D, 5, dtype=torch.float64)
    single_loss = mlk.SoftTripleLoss(C, 5, centers_per_class=K).double()
    sharded = mlk.SoftTripleLoss(C, 5, centers_per_class=K, process_group=group).double()
    sharded.load_state_dict(distributed.shard_state_dict(single_loss.state_dict(), sharded))
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(D, 5, dtype=torch.float64),
                                                    process_group=group)
    ddp.module.load_state_dict(backbone.state_dict())

    single_loss(backbone(x), y).backward()
    sharded(ddp(x[rows]), y[rows]).backward()
    start, stop = sharded.class_range
    for name, p in backbone.named_parameters():
        assert_close(ddp.module.get_parameter(name).grad, p.grad, RTOL, f"rank {rank}: backbone {name}")
    assert_close(sharded.proxies.grad, single_loss.proxies.grad[start * K:stop * K], RTOL, f"rank {rank}: proxies")


def _check_checkpoints(rank, world, group):
    """Full -> shards -> full on `group`, and a state_dict gathered from a sub-group of 2 ranks re-sharded for 3."""
    torch.manual_seed(1)
    full = mlk.L2SoftmaxLoss(C, D)  # proxies and bias, both per class
    with torch.no_grad():
        full.bias.normal_()
    sharded = mlk.L2SoftmaxLoss(C, D, process_group=group)
    sharded.load_state_dict(distributed.shard_state_dict(full.state_dict(), sharded))
    start, stop = sharded.class_range
    assert torch.equal(sharded.proxies, full.proxies[start:stop]) and torch.equal(sharded.bias, full.bias[start:stop])
    assert sharded.state_dict()["class_range"].tolist() == [start, stop]
    gathered = distributed.gather_state_dict(sharded)
    if rank == 0:
        assert gathered.keys() == full.state_dict().keys()
        assert all(torch.equal(gathered[k], v) for k, v in full.state_dict().items())
    else:
        assert gathered is None
    with pytest.raises(RuntimeError, match="class_range: missing"):  # an unsharded state_dict, loaded as it is
        sharded.load_state_dict(full.state_dict())
    other = distributed.shard_state_dict(full.state_dict(), sharded)
    other["class_range"] = torch.tensor([0, stop - start])
    if start != 0:
        with pytest.raises(RuntimeError, match=f"the state_dict holds classes \\[0, {stop - start}\\)"):
            sharded.load_state_dict(other)

    pair = dist.new_group([0, 1])  # collective: every rank creates it
    if rank < 2:
        two = mlk.SoftTripleLoss(C, D, centers_per_class=K, process_group=pair)
        saved = distributed.gather_state_dict(two)
        shards = [torch.empty(0, D)] * 2
        dist.all_gather_object(shards, two.proxies.detach(), group=pair)
        if rank == 0:
            assert torch.equal(saved["proxies"], torch.cat(shards))
            torch.save(saved, os.environ["MLK_TEST_CHECKPOINT"])
    dist.barrier()
    three = mlk.SoftTripleLoss(C, D, centers_per_class=K, process_group=group)
    saved = torch.load(os.environ["MLK_TEST_CHECKPOINT"])
    three.load_state_dict(distributed.shard_state_dict(saved, three))
    start, stop = three.class_range
    assert torch.equal(three.proxies, saved["proxies"][start * K:stop * K])


def _check_compile(rank, world, group):
    """Sharded losses trace into one graph (the collectives are torch's functional ones) and the compiled step
    equals the eager one. ProxyRepelLoss is the exception (it reads its shards' sizes on the host)."""
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    x, y, _, _ = _batch(world, 6)
    x, y = x[rows], y[rows]
    for module in (mlk.SoftTripleLoss(C, D, centers_per_class=K, backend="chunked", process_group=group),
                   mlk.MultiSimilarityLoss(process_group=group)):
        module = module.double()
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(module)(x, y)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
        steps = []
        for run in (module, torch.compile(module, backend="aot_eager", fullgraph=True)):
            xr = x.clone().requires_grad_()
            value = run(xr, y)
            value.backward()
            steps.append((value.detach(), xr.grad, [p.grad.clone() for p in module.parameters()]))
            module.zero_grad()
        assert_close(steps[1][0], steps[0][0], RTOL, f"{type(module).__name__}: compiled value")
        for got, expected in zip([steps[1][1], *steps[1][2]], [steps[0][1], *steps[0][2]]):
            assert_close(got, expected, RTOL, f"{type(module).__name__}: compiled gradient")
    torch._dynamo.reset()


def _worker(rank, world):
    group = dist.group.WORLD
    _check_proxy_losses(rank, world, group)
    _check_sampling(rank, world, group)
    _check_errors(rank, world, group)
    _check_pair_losses(rank, world, group)
    _check_ddp_backbone(rank, world, group)
    if world == 2:  # (compiling costs seconds per loss)
        _check_compile(rank, world, group)
    else:
        _check_checkpoints(rank, world, group)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_losses_equal_one_process(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MLK_TEST_CHECKPOINT", str(tmp_path / "checkpoint.pt"))
    run_world(_worker, world)
