"""The benchmark harness: timing, peak memory and the facts about the machine that a result needs to be read.

Used by `python -m metricloss_kernels bench` and the scripts in benchmarks/. Conventions:
- time: every round runs each implementation once, in a rotating order, after one warm-up round, so that ratios
  compare runs taken under the same load (the machine may be shared); CUDA work is synchronised around each call.
- memory: "torch_alloc" = the peak of live bytes allocated by torch during one call beyond those live before it
  (CUDA: the caching allocator's peak; CPU: the profiler's allocation events), gradients included;
  "rss_growth" = the peak growth of the process's resident set during the first (cold) call, sampled every 2 ms
  (for code that allocates outside torch: the C++ kNN op, faiss).
"""
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import sys
import threading
import time

import torch

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# module -> distributions that provide it
OPTIONAL = {"triton": ("triton",), "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
            "pytorch_metric_learning": ("pytorch-metric-learning",), "numpy": ("numpy",), "sklearn": ("scikit-learn",)}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def version(module: str) -> str | None:
    """The installed version of an OPTIONAL module's distribution (without importing it), or None."""
    for dist in OPTIONAL[module]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info(device) -> dict:
    """Device, thread count, versions, date, command and load of this run."""
    from .. import __version__, has_extension

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.device(device).type, "device_name": device_name(device), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "metricloss_kernels": __version__, **{m: version(m) for m in OPTIONAL}},
        "blas": "MKL" if torch.backends.mkl.is_available() else "other", "knn_cpp_op": has_extension(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "load_average_1min": load_average(),
    }


def time_interleaved(runs: dict, rounds: int, device="cpu") -> dict:
    """{name: callable} -> {name: [seconds per round]}: one warm-up round, then `rounds` rounds, each calling every
    callable once in an order rotated by one each round."""
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(rounds + 1):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = time.perf_counter()
            runs[name]()
            sync(device)
            if r:
                times[name].append(time.perf_counter() - start)
    return times


def peak_torch_bytes(fn, device="cpu") -> int:
    """Peak of live torch allocations during fn() beyond those live before it (see the module's conventions)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:  # nbytes < 0 for a free
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Context manager: `.growth` = peak resident-set growth (bytes) during the block, sampled by a thread."""

    def __init__(self, interval=0.002):
        self.interval = interval

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.growth = max(self.peak, rss_bytes()) - self.base


def peak_rss_growth(fn):
    """(peak resident-set growth in bytes during fn(), fn's result). Measure a cold call: memory that an earlier
    call freed but the allocator kept resident would not show as growth."""
    gc.collect()
    with PeakRSS() as mem:
        out = fn()
    return mem.growth, out


def write_json(path: str, result) -> None:
    """Write a benchmark's `result` to `path` as indented JSON (its folder created) and say so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path, flush=True)


def max_over_ranks(values, group) -> list:
    """The elementwise maxima of the numbers `values` over the ranks of `group` (the values themselves for None),
    as floats: what a world reports of a per-rank measurement."""
    t = torch.tensor(values, dtype=torch.float64)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, dist.ReduceOp.MAX, group=group)
    return t.tolist()


def _rank(rank, world, port, threads, measure, extra, queue):
    """One rank of run_world: its gloo group (None for a world of 1) around measure; rank 0 returns its rows."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    group = None
    if world > 1:
        timeout = datetime.timedelta(minutes=30)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        group = dist.group.WORLD
    try:
        rows = measure(rank, world, group, *extra)
    finally:
        if group is not None:
            dist.destroy_process_group()
    if rank == 0:
        queue.put(rows)


def run_world(measure, world: int, threads: int, *extra):
    """What rank 0 of `measure(rank, world, group, *extra)` returns, with `threads` torch threads a rank: in this
    process (group None) when world is 1, else in `world` spawned processes of one gloo group on 127.0.0.1, whose
    store this process holds on a port the OS picks."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    if world == 1:
        _rank(0, 1, 0, threads, measure, extra, queue)
    else:
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(minutes=30))
        mp.start_processes(_rank, args=(world, store.port, threads, measure, extra, queue), nprocs=world,
                           start_method="spawn")
    return queue.get()
