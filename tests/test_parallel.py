"""Tiles spread over the intra-op threads (metricloss_kernels._parallel, the C++ `parallel_tasks`): every task run
once, the caller's thread state and errors carried over, and the chunked op and the streamed regulariser giving the
results of their tiles run in order, bit for bit the same from one call to the next.

Cause 7 of the reliability issue: on a CPU shared with another process, the chunked backend ran every op of every
tile split over all threads, each op waiting for the thread the OS had just descheduled (SoftTriple 0.66 s -> 17.5 s
per step); its tiles are now tasks that the threads claim one at a time (benchmarks/bench_contention.py measures it).
"""
import threading

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from metricloss_kernels import _parallel, chunked, fused
from metricloss_kernels import functional as F
from metricloss_kernels.lse import class_lse
from utils import TOL, assert_close, proxy_inputs

parallel_tasks = _parallel._parallel_tasks
pytestmark = pytest.mark.skipif(parallel_tasks is None, reason="needs the C++ extension metricloss_kernels._C")
THREADS = 2


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def calls(monkeypatch):
    """The task counts of every parallel_tasks call (the real one runs them)."""
    seen = []

    def counting(count, fn):
        seen.append(count)
        parallel_tasks(count, fn)

    monkeypatch.setattr(_parallel, "_parallel_tasks", counting)
    return seen


# ------------------------------------------------------------------------------------------ parallel_tasks
def first_tasks_meet(barrier):
    """fn's prologue: the first THREADS tasks wait for each other (without the GIL), so every worker runs one."""
    def meet(task):
        if task < THREADS:
            barrier.wait()
    return meet


@pytest.mark.parametrize("count", [0, 1, 5, 64])
def test_every_task_runs_once(count):
    seen, lock = [], threading.Lock()
    meet = first_tasks_meet(threading.Barrier(THREADS, timeout=30))

    def fn(task, worker):
        if count >= THREADS:
            meet(task)
        with lock:
            seen.append((task, worker, threading.get_ident()))

    parallel_tasks(count, fn)
    assert sorted(task for task, *_ in seen) == list(range(count))
    if count >= THREADS:  # every thread took part, each under its own worker id
        assert {worker for _, worker, _ in seen} == set(range(THREADS))
        assert len({ident for *_, ident in seen}) == THREADS


def test_the_first_error_is_raised_in_the_caller():
    def fn(task, worker):
        if task >= 3:
            raise ValueError(f"task {task} failed")

    with pytest.raises(ValueError, match=r"task \d+ failed"):
        parallel_tasks(40, fn)
    with pytest.raises(TypeError, match="fn must be callable"):
        parallel_tasks(3, None)

    def interrupted(task, worker):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        parallel_tasks(4, interrupted)


def test_tasks_see_the_callers_thread_state():
    def modes():
        seen = []
        meet = first_tasks_meet(threading.Barrier(THREADS, timeout=30))

        def fn(task, worker):
            meet(task)
            seen.append((worker, torch.is_grad_enabled(), torch.is_inference_mode_enabled()))

        parallel_tasks(THREADS, fn)
        assert {worker for worker, *_ in seen} == set(range(THREADS))
        return {tuple(modes) for _, *modes in seen}

    assert modes() == {(True, False)}
    with torch.no_grad():
        assert modes() == {(False, False)}
    with torch.inference_mode():
        assert modes() == {(False, True)}


def test_a_task_calling_parallel_tasks_runs_them_in_order():
    """Inside the parallel region there are no threads to spare: nested tasks run in the calling thread."""
    inner = []

    def fn(task, worker):
        here = threading.get_ident()
        parallel_tasks(3, lambda t, w: inner.append((task, t, w, threading.get_ident() == here)))

    parallel_tasks(4, fn)
    assert sorted(inner) == [(task, t, 0, True) for task in range(4) for t in range(3)]


# ---------------------------------------------------------------------------------------- the chunked op
N, C, D = 45, 61, 24
SERIAL = {torch.float32: 1e-5, torch.float64: 1e-12}  # parallel vs in order: only the summation order differs


def op_and_grads(x, w, b, labels, **kw):
    out = class_lse(x, w, labels, bias=b, impl="chunked", **kw)
    leaves = [t for t in (x, w, b) if t is not None]
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, leaves, upstream))


@pytest.mark.parametrize("dtype, w_dtype", [(torch.float32, None), (torch.float64, None),
                                            (torch.float32, torch.float16)])
@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_contention_tiles_are_tasks_of_the_threads(calls, monkeypatch, dtype, w_dtype, reduce, k, bias):
    """One parallel region per pass (forward, backward), a task per tile; the result is that of the tiles in order
    (to the summation order), and the same to the bit on every call. fp16 proxies: dW goes through scratch."""
    x, w, b, labels = proxy_inputs(N, C, k, D, dtype=dtype, w_dtype=w_dtype, bias=bias, seed=k + 2 * bias,
                                   requires_grad=True)
    kw = dict(centers_per_class=k, scale=7.0, shift=0.5, reduce=reduce, block_rows=16, block_classes=9)

    first = op_and_grads(x, w, b, labels, **kw)
    assert calls == [7, 7]  # a task per tile: ceil(61 / 9)
    again = op_and_grads(x, w, b, labels, **kw)
    monkeypatch.setattr(_parallel, "_parallel_tasks", None)
    in_order = op_and_grads(x, w, b, labels, **kw)
    for got, same, expected in zip(first, again, in_order):
        assert torch.equal(got, same)
        assert_close(got, expected, TOL[torch.float16] if got.dtype == torch.float16 else SERIAL[dtype])


def test_several_tiles_a_group(calls, monkeypatch):
    """dX accumulators over budget: one group a thread in the backward, several tiles each; the forward, which
    accumulates no dX, keeps a task per tile."""
    monkeypatch.setattr(chunked, "_GROUP_BYTES", N * D * 8)  # one fp64 [N, D] accumulator a thread
    x, w, _, labels = proxy_inputs(N, C, 1, D, requires_grad=True)
    first = op_and_grads(x, w, None, labels, scale=3.0, block_classes=9)
    assert calls == [7, THREADS]
    monkeypatch.setattr(_parallel, "_parallel_tasks", None)
    for got, expected in zip(first, op_and_grads(x, w, None, labels, scale=3.0, block_classes=9)):
        assert_close(got, expected, SERIAL[torch.float64])


def test_tiles_from_the_byte_budget(calls, monkeypatch):
    """Without block_classes the tile count comes from the byte budget, rounded up to a multiple of the threads."""
    monkeypatch.setattr(chunked, "_TILE_BYTES", {"cpu": N * C * 8 // 5})  # 5 tiles by the budget -> 6
    x, w, _, labels = proxy_inputs(N, C, 1, D, requires_grad=True)
    first = op_and_grads(x, w, None, labels, scale=3.0)
    assert calls == [6, 6]
    monkeypatch.setattr(_parallel, "_parallel_tasks", None)
    for got, expected in zip(first, op_and_grads(x, w, None, labels, scale=3.0)):
        assert_close(got, expected, SERIAL[torch.float64])


def test_results_do_not_depend_on_the_schedule(monkeypatch):
    """Tasks run last to first, each under another worker id (so with another worker's scratch): the same bits."""
    x, w, b, labels = proxy_inputs(N, C, 3, D, dtype=torch.float32, bias=True, requires_grad=True)
    kw = dict(centers_per_class=3, scale=7.0, block_classes=5)
    expected = op_and_grads(x, w, b, labels, **kw)

    counts = []

    def backwards(count, fn):
        counts.append(count)
        for task in reversed(range(count)):
            fn(task, (count - 1 - task) % THREADS)

    monkeypatch.setattr(_parallel, "_parallel_tasks", backwards)
    for got, same in zip(op_and_grads(x, w, b, labels, **kw), expected):
        assert torch.equal(got, same)
    assert counts == [13, 13]  # a task per tile: ceil(61 / 5)


def test_small_problems_run_in_order(calls):
    """Fewer than two tiles a thread: no tasks (their fixed costs would outweigh the balance they bring)."""
    x, w = torch.randn(8, D, requires_grad=True), torch.randn(30, D, requires_grad=True)
    out = class_lse(x, w, torch.randint(0, 30, (8,)), impl="chunked", block_classes=10)
    out.sum().backward()
    assert calls == []


def test_python_modes_run_in_order(calls):
    """Python modes (a FLOP counter here) keep state that is not made for several threads: the chunked tiles that
    run under one run in order in the caller, with the same result."""
    from metricloss_kernels.lse import LSESpec

    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(N, D, generator=g), torch.randn(C, D, generator=g)
    labels = torch.randint(0, C, (N,), generator=g)
    spec = LSESpec(block_classes=5, impl="chunked")
    expected = chunked.forward(x, w, labels, None, spec)
    assert calls == [13]
    with FlopCounterMode(display=False) as flops:
        got = chunked.forward(x, w, labels, None, spec)
    assert calls == [13] and flops.get_total_flops() > 0
    assert_close(got, expected, SERIAL[torch.float32])


def test_concurrent_callers_get_their_own_results():
    """Two Python threads running the op at once (each its own team of threads) get what each gets alone."""
    g = torch.Generator().manual_seed(6)
    problems = [(torch.randn(N, D, generator=g), torch.randn(C, D, generator=g), torch.randint(0, C, (N,),
                 generator=g)) for _ in range(2)]
    alone = [class_lse(x, w, y, impl="chunked", block_classes=4) for x, w, y in problems]
    results, errors = [None, None], []

    def work(i):
        try:
            x, w, y = problems[i]
            for _ in range(20):
                results[i] = class_lse(x, w, y, impl="chunked", block_classes=4)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    callers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in callers) and not errors
    assert all(torch.equal(r, a) for r, a in zip(results, alone))


# ------------------------------------------------------------------------------------ the streamed regulariser
def test_contention_regularizer_blocks_are_tasks_of_the_threads(calls, monkeypatch):
    """SoftTriple's R(W), streamed over blocks of classes: a task per block, and the blocks' result in order."""
    monkeypatch.setattr(fused, "_REGULARIZER_BLOCK_BYTES", 4 * 3 * D * 4)  # 4 classes a block: 16 blocks
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, D, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(C * 3, D, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, C, (N,), generator=g)

    def loss_and_grads():
        loss = F.soft_triple_loss(x, labels, w, centers_per_class=3, tau=0.5, backend="chunked")
        return (loss, *torch.autograd.grad(loss, (x, w)))

    first = loss_and_grads()
    # the target cosines' forward and backward (one region each, _parallel.serial), the regulariser's 16 blocks
    assert sorted(calls) == [2, 2, 16, 16]
    monkeypatch.setattr(_parallel, "_parallel_tasks", None)
    for got, expected in zip(first, loss_and_grads()):
        assert_close(got, expected, SERIAL[torch.float64])
    reference = F.soft_triple_loss(x, labels, w, centers_per_class=3, tau=0.5, backend="reference")
    assert_close(first[0], reference, TOL[torch.float64])


def test_create_graph_runs_the_regularizer_backward_in_order(calls, monkeypatch):
    """Under create_graph=True the regulariser's backward records autograd ops (on views of one dW, which threads
    must not share): its blocks run in order, in the caller, with the gradient of the plain backward."""
    monkeypatch.setattr(fused, "_REGULARIZER_BLOCK_BYTES", 4 * 3 * D * 4)
    w = torch.randn(C * 3, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64).requires_grad_()

    def grad(create_graph):
        return torch.autograd.grad(fused._ProxyRegularizer.apply(w, 3, torch.float64), w, create_graph=create_graph)[0]

    recorded = grad(create_graph=True)
    assert calls == [16] and recorded.requires_grad  # tasks for the forward only
    assert_close(recorded, grad(create_graph=False), SERIAL[torch.float64])
    assert calls == [16, 16, 16]


# ------------------------------------------------------------------------------------------ the target cosines
def test_contention_target_cosines_run_in_one_region_each(calls, monkeypatch):
    """The [N, K, D] ops of the target similarities (too small to split over threads, each of which would wait for
    a descheduled thread) run single-threaded in one parallel region per pass, with the gradients of the reference."""
    x, w, _, labels = proxy_inputs(N, C, 3, D, seed=9, requires_grad=True)
    loss = F.soft_triple_loss(x, labels, w, centers_per_class=3, tau=0.0, backend="chunked")
    got = torch.autograd.grad(loss, (x, w))
    assert calls == [2, 2]  # class_lse itself is one tile here
    reference = F.soft_triple_loss(x, labels, w, centers_per_class=3, tau=0.0, backend="reference")
    for g, r in zip(got, torch.autograd.grad(reference, (x, w))):
        assert_close(g, r, TOL[torch.float64])


def test_serial_returns_and_raises():
    assert _parallel.serial(lambda: torch.arange(3).sum(), torch.ones(1)) == 3
    with pytest.raises(ZeroDivisionError):
        _parallel.serial(lambda: 1 / 0, torch.ones(1))
