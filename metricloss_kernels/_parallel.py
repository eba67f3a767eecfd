"""Independent tasks spread over the intra-op threads, for the streamed backend on CPU.

`plan` says how to cut a piece of work into chunks and tasks, `run(tasks, fn, t)` calls fn(task, worker) for every
task. On CPU, with the C++ extension built, the tasks are claimed one at a time by the intra-op threads
(``metricloss_kernels._C.parallel_tasks``, csrc/module.cpp) and the torch ops inside a task run single-threaded: one
parallel region per call instead of one per op. A tile's dozens of small ops each split over every thread wait at
every op for the slowest thread, which on a machine shared with other processes is whichever one the OS has just
descheduled; tasks claimed from a counter leave a descheduled thread's share to the others.

Elsewhere the tasks run in order in the caller, their ops using the intra-op threads as usual: other devices, one
thread, no extension, and whatever keeps state that is not made for several threads or is not carried to them:
torch.compile or torch.jit tracing, functorch transforms, tensor subclasses, active Python modes (fake tensors,
dispatch modes such as a FLOP counter), and autograd recording (an autograd.Function's backward under
create_graph=True). `t` stands for the tensors of the work: the callers' other tensors are plain ones like it.
"""
import math

import torch

try:
    from ._C import parallel_tasks as _parallel_tasks
except ImportError:  # the extension is not built: tasks run in order
    _parallel_tasks = None

__all__ = ["workers", "plan", "share", "run", "serial"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensor types without Python overrides of torch functions
# Tasks are used from this many chunks a thread on: with fewer, their fixed costs (fresh scratch for every thread,
# Python between the ops) outweigh the balance they bring.
MIN_TASKS_PER_WORKER = 2


def workers(t: torch.Tensor) -> int:
    """How many tasks `run` executes at once for work on tensors like `t`."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or _parallel_tasks is None
            or type(t) not in _PLAIN or t.device.type != "cpu" or (torch.is_grad_enabled() and t.requires_grad)
            or torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack()
            or torch._C._are_functorch_transforms_active()):
        return 1
    return torch.get_num_threads()


def plan(items: int, chunks: int, t: torch.Tensor, max_per_worker: int | None = None,
         size: int = 0) -> tuple[int, int, int]:
    """How to cut `items` (classes, say) into chunks for tasks on tensors like `t`: (size, chunks, tasks).

    The chunks hold `size` items each (the last one fewer): the given size, else at least `chunks` equal ones.
    tasks = 1 (the chunks in order, ops multi-threaded) with fewer than MIN_TASKS_PER_WORKER chunks a thread or
    max_per_worker < 1; else a multiple of the thread count (equal shares on a quiet machine, the chunk count
    rounded up to fit), at most max_per_worker a thread, and never more than the chunks. Task i runs the chunks
    `share(i, tasks, chunks)`."""
    threads, chunks, tasks = workers(t), max(1, chunks), 1
    per_worker = math.ceil(chunks / threads)
    if max_per_worker is not None:
        per_worker = min(per_worker, max_per_worker)
    if threads > 1 and chunks >= MIN_TASKS_PER_WORKER * threads and per_worker >= 1:
        tasks = threads * per_worker
        chunks = math.ceil(chunks / tasks) * tasks
    size = max(1, min(items, size or math.ceil(items / chunks)))
    chunks = math.ceil(items / size)
    return size, chunks, max(1, min(tasks, chunks))


def share(task: int, tasks: int, chunks: int) -> range:
    """The chunks of `task`: a contiguous, equal share of range(chunks)."""
    return range(task * chunks // tasks, (task + 1) * chunks // tasks)


def run(tasks: int, fn, t: torch.Tensor) -> None:
    """fn(task, worker) for task in range(tasks), worker in range(workers(t)): each task once, on one worker at a
    time (a worker's scratch is its own); the order of the tasks is not defined."""
    if tasks > 1 and workers(t) > 1:
        _parallel_tasks(tasks, fn)
    else:
        for task in range(tasks):
            fn(task, 0)


def serial(fn, t: torch.Tensor):
    """fn()'s result, fn's torch ops run single-threaded inside one parallel region (the other thread idles): for a
    run of ops too small to split over threads, which on a loaded machine would each wait for a descheduled thread.
    In order in the caller, ops multi-threaded, where `run` would run tasks in order."""
    if workers(t) == 1:
        return fn()
    result = []
    _parallel_tasks(2, lambda task, worker: result.append(fn()) if task == 0 else None)
    return result[0]
