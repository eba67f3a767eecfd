"""Proxy losses, forward + backward: reference vs chunked vs Triton (CUDA only) vs pytorch-metric-learning's class of
the same name.

What is measured, per case and implementation (gradients w.r.t. the embeddings and the proxies, as in training):
- time: one forward + backward, gradients reset to None before each run (so their allocation counts). Every round
  runs each implementation once, in turn, in one process, so the ratios compare runs taken under the same load (the
  machine may be shared); the JSON keeps min and median per implementation and the median of per-round ratios.
- memory (CPU): each implementation in a fresh subprocess, one cold forward + backward after the inputs exist:
  `peak_rss_mb` = VmHWM - VmRSS before the call (VmHWM reset through /proc/self/clear_refs), and `peak_alloc_mb` =
  the peak of live bytes allocated by torch during the call (torch.profiler memory events). Both are the extra
  memory of the call: temporaries plus the gradients. (CUDA: torch.cuda.max_memory_allocated over the call.)
- GPU only: effective TFLOP/s against 8*N*D*C*K (forward, recomputed forward, dX and dW GEMMs) and the GEMM floor:
  the same four GEMMs through torch.mm, timed in the same run.

    python benchmarks/bench_proxy_losses.py --threads 2            # CPU grid -> results/proxy_losses_cpu.json
    python benchmarks/bench_proxy_losses.py --cases soft_triple --rounds 3 --output /tmp/x.json
    python benchmarks/bench_proxy_losses.py --device cuda          # DESIGN grid (N=1024, D=512, P=1e4..1e6)
"""
import argparse
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from metricloss_kernels import fused, reference  # noqa: E402
from metricloss_kernels.lse import class_lse  # noqa: E402

# name -> (loss function name, pytorch-metric-learning class, kwargs shared by ours and PML's, K)
LOSSES = {
    "soft_triple": ("soft_triple_loss", "SoftTripleLoss", dict(la=20.0, gamma=0.1, margin=0.01), 10),
    "proxy_anchor": ("proxy_anchor_loss", "ProxyAnchorLoss", dict(margin=0.1, alpha=32.0), 1),
    "proxy_nca": ("proxy_nca_loss", "ProxyNCALoss", dict(), 1),
    "arcface": ("arcface_loss", "ArcFaceLoss", dict(margin=28.6, scale=64.0), 1),
    "cosface": ("cosface_loss", "CosFaceLoss", dict(margin=0.35, scale=64.0), 1),
    "mpa": ("mpa_loss", None, dict(alpha=32.0, margin=0.1, gamma=0.1), 10),
}

# (case name, loss, N, D, C, dtype)
CPU_GRID = [
    ("soft_triple", "soft_triple", 256, 128, 20_000, "float32"),
    ("proxy_anchor", "proxy_anchor", 256, 128, 100_000, "float32"),
    ("proxy_nca", "proxy_nca", 256, 128, 100_000, "float32"),
    ("arcface", "arcface", 256, 128, 100_000, "float32"),
    ("mpa", "mpa", 256, 128, 20_000, "float32"),
    ("soft_triple_small", "soft_triple", 128, 64, 2_000, "float32"),
]


def gpu_grid():
    grid = []
    for dtype in ("float32", "bfloat16"):
        for p in (10_000, 100_000, 1_000_000):
            grid.append((f"proxy_anchor_P{p}_{dtype}", "proxy_anchor", 1024, 512, p, dtype))
            grid.append((f"soft_triple_P{p}_{dtype}", "soft_triple", 1024, 512, p // 10, dtype))
    return grid


def _case(name, grid):
    for case in grid:
        if case[0] == name:
            return case
    raise KeyError(name)


def build(case, impl, device, seed=0):
    """Inputs and a closure running forward + backward of `impl` on them; returns (run, params)."""
    _, loss, n, d, c, dtype = case
    fn_name, pml_name, kwargs, k = LOSSES[loss]
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    labels = torch.randint(0, c, (n,), generator=g).to(device)
    extra = {"centers_per_class": k} if fn_name in ("soft_triple_loss", "mpa_loss") else {}
    if impl == "pml":
        from pytorch_metric_learning import losses as pml_losses
        module = getattr(pml_losses, pml_name)(num_classes=c, embedding_size=d, **extra, **kwargs).to(device, dtype)
        params = [x] + list(module.parameters())
        fn = functools.partial(module, x, labels)
    else:
        w = torch.randn(c * k, d, generator=g).to(device, dtype).requires_grad_()
        params = [x, w]
        if impl == "reference":
            loss_fn = getattr(reference, fn_name)
        else:  # "chunked" or "triton": the class_lse implementation
            loss_fn = functools.partial(getattr(fused, fn_name), lse=functools.partial(class_lse, impl=impl))
        fn = functools.partial(loss_fn, x, labels, w, **extra, **kwargs)

    def run():
        for p in params:
            p.grad = None
        fn().backward()

    return run, params


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_memory(case, impl, device):
    """Extra peak memory (MB) of one cold forward + backward, in this (fresh) process."""
    run, params = build(case, impl, device)
    gc.collect()
    if device == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        _sync(device)
        return {"peak_alloc_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    run()
    peak_rss = (_status_kb("VmHWM") - base) / 1024
    for p in params:
        p.grad = None
    gc.collect()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return {"peak_rss_mb": peak_rss, "peak_alloc_mb": peak / 2**20}


def gemm_floor(case, device):
    """The four GEMMs of a streamed forward + backward (forward, recomputed forward, dX, dW) through torch.mm."""
    _, loss, n, d, c, dtype = case
    p = c * LOSSES[loss][3]
    dtype = getattr(torch, dtype)
    x = torch.randn(n, d, device=device, dtype=dtype)
    w = torch.randn(p, d, device=device, dtype=dtype)

    def run():
        l1 = x @ w.T
        l2 = x @ w.T
        _ = l2 @ w, l1.T @ x

    return run


def time_case(case, impls, device, rounds, threads):
    torch.set_num_threads(threads)
    runs = {impl: build(case, impl, device)[0] for impl in impls}
    if device == "cuda":
        runs["torch.mm"] = gemm_floor(case, device)
    times = {impl: [] for impl in runs}
    for r in range(rounds + 1):  # round 0 is the warm-up
        for impl, run in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            if r:
                times[impl].append(time.perf_counter() - t0)
    return times


def worker(args):
    grid = gpu_grid() if args.device == "cuda" else CPU_GRID
    case = _case(args.worker_case, grid)
    torch.set_num_threads(args.threads)
    if args.worker == "memory":
        out = measure_memory(case, args.worker_impls[0], args.device)
    else:
        out = time_case(case, args.worker_impls, args.device, args.rounds, args.threads)
    print("RESULT " + json.dumps(out))


def _spawn(args, mode, case_name, impls):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--worker-case", case_name,
           "--worker-impls", *impls, "--device", args.device, "--threads", str(args.threads),
           "--rounds", str(args.rounds)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", nargs="*", help="case names (default: the device's whole grid)")
    ap.add_argument("--impls", nargs="*", help="subset of reference, chunked, triton, pml")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--output", default=None)
    ap.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-case", help=argparse.SUPPRESS)
    ap.add_argument("--worker-impls", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    grid = gpu_grid() if args.device == "cuda" else CPU_GRID
    if args.cases:
        grid = [_case(name, grid) for name in args.cases]
    impls = args.impls or ["reference", "chunked"] + (["triton"] if args.device == "cuda" else []) + ["pml"]
    try:
        import pytorch_metric_learning
        pml_version = pytorch_metric_learning.__version__
    except ImportError:
        pml_version, impls = None, [i for i in impls if i != "pml"]
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    results = []
    for case in grid:
        name, loss, n, d, c, dtype = case
        k = LOSSES[loss][3]
        case_impls = [i for i in impls if i != "pml" or LOSSES[loss][1] is not None]
        load_before = os.getloadavg()[0]
        times = _spawn(args, "time", name, case_impls)
        row = {"case": name, "loss": LOSSES[loss][0], "N": n, "D": d, "C": c, "K": k, "dtype": dtype,
               "flops": 8 * n * d * c * k, "loadavg_1min": [load_before, os.getloadavg()[0]], "impls": {}}
        if "error" in times:
            row["error"] = times["error"]
            results.append(row)
            print(name, "ERROR", times["error"])
            continue
        for impl, ts in times.items():
            entry = {"time_ms_min": 1e3 * min(ts), "time_ms_median": 1e3 * statistics.median(ts),
                     "times_ms": [1e3 * t for t in ts]}
            if args.device == "cuda":
                entry["tflops"] = row["flops"] / min(ts) / 1e12
            if impl != "torch.mm" and not args.no_memory:
                entry.update(_spawn(args, "memory", name, [impl]))
            row["impls"][impl] = entry
        ours = ("triton", "chunked") if args.device == "cuda" else ("chunked", "triton")  # the backend "auto" picks
        base = times.get(ours[0]) or times.get(ours[1])
        row["ratios_vs_ours_median_per_round"] = {
            impl: statistics.median(t / b for t, b in zip(ts, base)) for impl, ts in times.items()} if base else {}
        results.append(row)
        summary = "  ".join(f"{impl} {e['time_ms_median']:.0f} ms"
                            + (f" / {e['peak_alloc_mb']:.0f} MB" if "peak_alloc_mb" in e else "")
                            for impl, e in row["impls"].items())
        print(f"{name:22s} N={n} D={d} C={c} K={k} {dtype}: {summary}", flush=True)

    device_name = (torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or
                   platform.machine())
    if args.device == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                device_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    out = {
        "benchmark": "proxy losses, forward + backward (grads w.r.t. embeddings and proxies)",
        "device": args.device, "device_name": device_name, "threads": args.threads, "rounds": args.rounds,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
                     "pytorch_metric_learning": pml_version},
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "cpu_count": os.cpu_count(),
        "notes": "time: min/median over rounds after a warm-up, implementations interleaved per round; "
                 "loadavg_1min: the machine's load before/after the timing (it may be shared); "
                 "ratios: median over rounds of time(impl)/time(ours); memory: extra peak of one cold call "
                 "(peak_alloc_mb: torch allocations, peak_rss_mb: VmHWM growth), gradients included.",
        "results": results,
    }
    path = args.output or os.path.join(ROOT, "benchmarks", "results", f"proxy_losses_{args.device}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
