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
from utils import TOL, assert_close

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
@pytest.mark.parametrize("count", [0, 1, 5, 64])
def test_every_task_runs_once(count):
    seen, lock = [], threading.Lock()

    def fn(task, worker):
        with lock:
            seen.append((task, worker))

    parallel_tasks(count, fn)
    assert sorted(task for task, _ in seen) == list(range(count))
    assert all(0 <= worker < THREADS for _, worker in seen)


def test_the_first_error_is_raised_in_the_caller():
    def fn(task, worker):
        if task >= 3:
            raise ValueError(f"task {task} failed")

    with pytest.raises(ValueError, match=r"task \d+ failed"):
        parallel_tasks(40, fn)
    with pytest.raises(TypeError, match="fn must be callable"):
        parallel_tasks(3, None)


def test_tasks_see_the_callers_thread_state():
    def modes():
        seen = []
        parallel_tasks(8, lambda task, worker: seen.append((torch.is_grad_enabled(),
                                                            torch.is_inference_mode_enabled())))
        return set(seen)

    assert modes() == {(True, False)}
    with torch.no_grad():
        assert modes() == {(False, False)}
    with torch.inference_mode():
        assert modes() == {(False, True)}


# ---------------------------------------------------------------------------------------- the chunked op
N, C, D = 45, 61, 24
SERIAL = {torch.float32: 1e-5, torch.float64: 1e-12}  # parallel vs in order: only the summation order differs


def op_and_grads(x, w, b, labels, **kw):
    out = class_lse(x, w, labels, bias=b, impl="chunked", **kw)
    leaves = [t for t in (x, w, b) if t is not None]
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, leaves, upstream))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_contention_tiles_are_tasks_of_the_threads(calls, monkeypatch, dtype, reduce, k, bias):
    """One parallel region per pass (forward, backward), a task per tile; the result is that of the tiles in order
    (to the summation order), and the same to the bit on every call."""
    g = torch.Generator().manual_seed(k + 2 * bias)
    x = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(C * k, D, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(C, generator=g, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, C, (N,), generator=g)
    kw = dict(centers_per_class=k, scale=7.0, shift=0.5, reduce=reduce, block_rows=16, block_classes=9)

    first = op_and_grads(x, w, b, labels, **kw)
    assert calls == [7, 7]  # a task per tile: ceil(61 / 9)
    again = op_and_grads(x, w, b, labels, **kw)
    monkeypatch.setattr(_parallel, "_parallel_tasks", None)
    in_order = op_and_grads(x, w, b, labels, **kw)
    for got, same, expected in zip(first, again, in_order):
        assert torch.equal(got, same)
        assert_close(got, expected, SERIAL[dtype])


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
    results = [None, None]

    def work(i):
        x, w, y = problems[i]
        for _ in range(20):
            results[i] = class_lse(x, w, y, impl="chunked", block_classes=4)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
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
    assert 16 in calls and calls.count(16) == 2  # the regulariser's forward and backward
    monkeypatch.setattr(_parallel, "_parallel_tasks", None)
    for got, expected in zip(first, loss_and_grads()):
        assert_close(got, expected, SERIAL[torch.float64])
    reference = F.soft_triple_loss(x, labels, w, centers_per_class=3, tau=0.5, backend="reference")
    assert_close(first[0], reference, TOL[torch.float64])
