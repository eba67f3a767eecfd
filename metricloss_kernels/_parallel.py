"""Independent tasks spread over the intra-op threads, for the streamed backend on CPU.

`run(count, fn, t)` calls fn(task, worker) for every task, `plan` says how many tasks a piece of work is worth. On CPU, with the C++ extension built, the tasks
are claimed one at a time by the intra-op threads (``metricloss_kernels._C.parallel_tasks``, csrc/module.cpp) and
the torch ops inside a task run single-threaded: one parallel region per call instead of one per op. A tile's
dozens of small ops each split over every thread wait at every op for the slowest thread, which on a machine
shared with other processes is whichever one the OS has just descheduled; tasks claimed from a counter leave a
descheduled thread's share to the others. Elsewhere the tasks run in order in the caller, their ops using the
intra-op threads as usual: other devices, one thread, no extension, code traced by torch.compile, and tensor
subclasses or active Python modes (fake tensors, dispatch modes such as a FLOP counter), whose Python state is not
made for several threads.
"""
import math

import torch

try:
    from ._C import parallel_tasks as _parallel_tasks
except ImportError:  # the extension is not built: tasks run in order
    _parallel_tasks = None

__all__ = ["workers", "plan", "share", "run"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensor types without Python overrides of torch functions


def workers(t: torch.Tensor) -> int:
    """How many tasks `run` executes at once for tasks on the tensor `t` (and others like it)."""
    if (torch.compiler.is_compiling() or _parallel_tasks is None or type(t) not in _PLAIN or t.device.type != "cpu"
            or torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack()):
        return 1
    return torch.get_num_threads()


# Tasks are spread over the threads when there are at least this many a thread: fewer, the fixed costs of the tasks
# (fresh scratch for every thread, Python between the ops) outweigh the balance they bring.
MIN_TASKS_PER_WORKER = 2


def plan(chunks: int, t: torch.Tensor, max_tasks: int | None = None) -> tuple[int, int]:
    """(chunks', tasks) for work that splits into at least `chunks` equal chunks on tensors like `t`: tasks = 1 (run
    in order, ops multi-threaded) or a multiple of the thread count (equal shares on a quiet machine), at most
    `max_tasks`, each with as many of the chunks' >= chunks."""
    threads = workers(t)
    per_worker = math.ceil(chunks / threads)
    if max_tasks is not None:
        per_worker = min(per_worker, max_tasks // threads)
    if threads == 1 or chunks < MIN_TASKS_PER_WORKER * threads or per_worker < 1:
        return chunks, 1
    tasks = threads * per_worker
    return math.ceil(chunks / tasks) * tasks, tasks


def share(task: int, tasks: int, chunks: int) -> range:
    """The chunks of `task`: a contiguous, equal share of range(chunks)."""
    return range(task * chunks // tasks, (task + 1) * chunks // tasks)


def run(count: int, fn, t: torch.Tensor) -> None:
    """fn(task, worker) for task in range(count), worker in range(workers(t)): each task once, on one worker at a
    time (a worker's scratch is its own); the order of the tasks is not defined."""
    if count > 1 and workers(t) > 1:
        _parallel_tasks(count, fn)
    else:
        for task in range(count):
            fn(task, 0)
