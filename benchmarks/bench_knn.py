"""Exact top-k retrieval on CPU: metricloss_kernels.knn (C++ op) vs faiss-cpu IndexFlatIP vs chunked torch.mm + topk.

Default problem (DESIGN.md target): 20,000 queries x 100,000 references x D = 128, k in {1, 16, 128}, 2 threads,
random unit vectors, inner-product similarity (our op with metric="dot"; IndexFlatIP is the same math).
Each round runs every method once per k in an interleaved order, so that the ratios compare runs taken under the
same load (the machine may be shared); the JSON keeps every round and the per-round ratios' medians.

--metric euclidean compares with faiss IndexFlatL2 and chunked torch.cdist + topk instead, and also runs our op
with metric="dot" on the same data in every round: "time_ratio_vs_our_dot" is then the cost of the exact
euclidean search (centring, error-bounded candidate window, direct fp64 re-rank) over the plain GEMM + selection,
a ratio taken under the same load.

Memory: growth of the process's resident set over its level before the call, sampled every 2 ms by a thread
(reads /proc/self/statm), so it counts the search's temporary buffers, not the inputs.  The faiss index's own
copy of the references is built before the measurement and reported separately.

    python benchmarks/bench_knn.py                       # full size, writes benchmarks/results/knn_cpu.json
    python benchmarks/bench_knn.py --metric euclidean    # writes benchmarks/results/knn_cpu_euclidean.json
    python benchmarks/bench_knn.py --queries 2000 --references 20000 --output /tmp/knn.json   # quick
    python benchmarks/bench_knn.py --tune --queries 4000  # sweep the op's block sizes (k = 16)
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import threading
import time

import numpy as np
import torch

import metricloss_kernels
from metricloss_kernels import retrieval

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Context manager: peak resident-set growth (bytes) during the block, sampled by a background thread."""

    def __init__(self, interval=0.002):
        self.interval = interval

    def __enter__(self):
        self.base = rss_bytes()
        self.peak = self.base
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
        self.peak = max(self.peak, rss_bytes())
        self.growth = self.peak - self.base


def torch_chunked(queries, reference, k, metric, block_elements=1 << 26):
    """The baseline: torch.mm (torch.cdist for euclidean) over query blocks of at most 2^26 scores (256 MiB fp32)
    + torch.topk."""
    block = max(1, block_elements // reference.shape[0])
    values = torch.empty(queries.shape[0], k)
    indices = torch.empty(queries.shape[0], k, dtype=torch.long)
    for q0 in range(0, queries.shape[0], block):
        if metric == "euclidean":
            v, i = torch.cdist(queries[q0:q0 + block], reference).topk(k, dim=1, largest=False)
        else:
            v, i = torch.mm(queries[q0:q0 + block], reference.T).topk(k, dim=1)
        values[q0:q0 + block], indices[q0:q0 + block] = v, i
    return values, indices


def measure(fn):
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return seconds, mem.growth, out


def device_info():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return {"cpu": model, "logical_cpus": os.cpu_count(), "platform": platform.platform()}


def versions():
    import faiss
    return {"python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
            "numpy": np.__version__, "metricloss_kernels": getattr(metricloss_kernels, "__version__", "0.1.0"),
            "blas": "MKL" if torch.backends.mkl.is_available() else "other"}


def make_data(args):
    g = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=g), dim=1)
    reference = torch.nn.functional.normalize(torch.randn(args.references, args.dim, generator=g), dim=1)
    return queries.contiguous(), reference.contiguous()


def tune(args, queries, reference):
    k = 16
    for block_q in (64, 128, 256, 512):
        for block_r in (512, 1024, 2048, 4096):
            os.environ["METRICLOSS_KNN_BLOCK_Q"], os.environ["METRICLOSS_KNN_BLOCK_R"] = str(block_q), str(block_r)
            times = [measure(lambda: retrieval.knn(queries, reference, k=k, metric="dot"))[0]
                     for _ in range(args.repeats)]
            print(f"block_q={block_q:4d} block_r={block_r:5d}: median {statistics.median(times):.3f} s  "
                  f"(all {', '.join(f'{t:.3f}' for t in times)})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--references", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each runs every method once per k)")
    parser.add_argument("--metric", default="dot", choices=retrieval.METRICS, help="metric of our op")
    parser.add_argument("--tune", action="store_true", help="sweep the op's block sizes instead")
    parser.add_argument("--output", help="result file (default: benchmarks/results/knn_cpu.json, "
                        "knn_cpu_euclidean.json with --metric euclidean)")
    args = parser.parse_args()
    if args.output is None:
        name = "knn_cpu_euclidean.json" if args.metric == "euclidean" else "knn_cpu.json"
        args.output = os.path.join(os.path.dirname(__file__), "results", name)

    import faiss

    if not retrieval.has_extension():
        raise SystemExit("metricloss_kernels._C is not built: pip install --no-build-isolation -e .")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    queries, reference = make_data(args)
    if args.tune:
        return tune(args, queries, reference)

    load_before = os.getloadavg()
    euclidean = args.metric == "euclidean"
    faiss_name = "faiss.IndexFlatL2" if euclidean else "faiss.IndexFlatIP"
    torch_name = "torch.cdist+topk (chunked)" if euclidean else "torch.mm+topk (chunked)"
    index = faiss.IndexFlatL2(args.dim) if euclidean else faiss.IndexFlatIP(args.dim)
    before = rss_bytes()
    index.add(reference.numpy())
    index_bytes = rss_bytes() - before
    queries_np = queries.numpy()

    methods = {
        "metricloss_kernels.knn": lambda k: retrieval.knn(queries, reference, k=k, metric=args.metric),
        faiss_name: lambda k: tuple(map(torch.from_numpy, index.search(queries_np, k))),
        torch_name: lambda k: torch_chunked(queries, reference, k, args.metric),
    }
    if args.metric != "dot":  # the same op without the metric's own work, side by side
        methods["metricloss_kernels.knn (dot)"] = lambda k: retrieval.knn(queries, reference, k=k, metric="dot")
    rounds = []
    for r in range(args.repeats):
        for k in args.ks:
            row = {"round": r, "k": k}
            outputs = {}
            # rotate the order every round so no method always runs first (warm caches, neighbours' load)
            names = list(methods)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                seconds, growth, out = measure(lambda: methods[name](k))
                row[name] = {"seconds": seconds, "rss_growth_bytes": growth}
                outputs[name] = out
                print(f"round {r} k={k:4d} {name:26s} {seconds:7.3f} s  peak RSS growth "
                      f"{growth / 2**20:8.1f} MiB", flush=True)
            ours = outputs["metricloss_kernels.knn"][1]
            row["index_agreement_with_faiss"] = float((ours == outputs[faiss_name][1]).float().mean())
            rounds.append(row)

    summary = {}
    for k in args.ks:
        rows = [row for row in rounds if row["k"] == k]
        entry = {name: {"median_seconds": statistics.median(row[name]["seconds"] for row in rows),
                        "max_rss_growth_mib": max(row[name]["rss_growth_bytes"] for row in rows) / 2**20}
                 for name in methods}
        entry["time_ratio_vs_faiss"] = statistics.median(
            row["metricloss_kernels.knn"]["seconds"] / row[faiss_name]["seconds"] for row in rows)
        entry["speedup_vs_torch_chunked"] = statistics.median(
            row[torch_name]["seconds"] / row["metricloss_kernels.knn"]["seconds"] for row in rows)
        if "metricloss_kernels.knn (dot)" in methods:
            entry["time_ratio_vs_our_dot"] = statistics.median(
                row["metricloss_kernels.knn"]["seconds"] / row["metricloss_kernels.knn (dot)"]["seconds"]
                for row in rows)
        flops = 2 * args.queries * args.references * args.dim
        entry["ours_gflops"] = flops / entry["metricloss_kernels.knn"]["median_seconds"] / 1e9
        entry["index_agreement_with_faiss"] = min(row["index_agreement_with_faiss"] for row in rows)
        summary[f"k={k}"] = entry
        print(f"k={k}: ours/faiss time {entry['time_ratio_vs_faiss']:.3f}, torch/ours "
              f"{entry['speedup_vs_torch_chunked']:.2f}x, ours {entry['ours_gflops']:.0f} GFLOP/s, "
              f"ours peak RSS growth {entry['metricloss_kernels.knn']['max_rss_growth_mib']:.1f} MiB"
              + (f", ours {args.metric}/dot time {entry['time_ratio_vs_our_dot']:.3f}"
                 if "time_ratio_vs_our_dot" in entry else ""))

    result = {
        "benchmark": "knn_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(),
        # 1-minute load average before and after (the benchmark itself adds about `threads`): a shared machine's
        # contention favours dynamically scheduled work (our op) over statically split OpenMP loops (faiss, torch.mm)
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "versions": versions(),
        "config": {"queries": args.queries, "references": args.references, "dim": args.dim, "ks": args.ks,
                   "threads": args.threads, "repeats": args.repeats, "metric": args.metric,
                   "data": "random unit vectors (torch.Generator seed 0)",
                   "block_q": os.environ.get("METRICLOSS_KNN_BLOCK_Q", "default"),
                   "block_r": os.environ.get("METRICLOSS_KNN_BLOCK_R", "default"),
                   "faiss_index_bytes": index_bytes},
        "summary": summary,
        "rounds": rounds,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
