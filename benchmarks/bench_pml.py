"""pytorch-metric-learning (PML) vs metricloss_kernels.pml, same class names and state_dict, on CPU.

Losses, forward + backward (gradients w.r.t. the embeddings and the weights): ProxyAnchor C=1e5, SoftTriple
C=2e4 K=10, ArcFace C=1e5 (N=256, D=128, fp32, PML's default arguments). AccuracyCalculator: 100k x 100k (queries =
reference, leave-one-out), D=128, 1000 classes, k="max_bin_count", the kNN metrics (NMI/AMI excluded), PML with its
default faiss kNN vs ours on the exact kNN op.

Method (metricloss_kernels/experiments/harness.py): time: rounds that run each implementation once, in a rotating order,
in one process, after a warm-up round (ratios compare runs under the same load); the JSON keeps the rounds, the medians
and the median of per-round ratios. Memory: each implementation in a fresh subprocess, one cold call after the inputs
exist: rss_growth_mb = the peak growth of the resident set during the call; for the losses also torch_alloc_mb = the
peak of live torch allocations during a second call. Both are the call's extra memory.

    python benchmarks/bench_pml.py --threads 2                    # everything -> results/pml_cpu.json
    python benchmarks/bench_pml.py --memory-only                  # no timings (memory is load-independent)
    python benchmarks/bench_pml.py --scale 0.01 --rounds 1 --output /tmp/pml_small.json   # a quick check
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from metricloss_kernels.experiments import harness  # noqa: E402

# name -> (PML class name, N, D, C, constructor arguments); C is multiplied by --scale
LOSS_CASES = {
    "proxy_anchor": ("ProxyAnchorLoss", 256, 128, 100_000, {}),
    "soft_triple": ("SoftTripleLoss", 256, 128, 20_000, {"centers_per_class": 10}),
    "arcface": ("ArcFaceLoss", 256, 128, 100_000, {}),
}
ACCURACY_CASE = {"n": 100_000, "d": 128, "classes": 1000}  # n is multiplied by --scale
IMPLEMENTATIONS = ("pml", "ours")


def build(case, impl, scale):
    """A closure running one call of `impl` on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    if case == "accuracy":
        n = max(int(ACCURACY_CASE["n"] * scale), 2 * ACCURACY_CASE["classes"])
        x = torch.randn(n, ACCURACY_CASE["d"], generator=g)
        y = torch.randint(0, ACCURACY_CASE["classes"], (n,), generator=g)
        if impl == "pml":
            from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        else:
            from metricloss_kernels.pml import AccuracyCalculator
        calculator = AccuracyCalculator(k="max_bin_count", exclude=("NMI", "AMI"), device=torch.device("cpu"))
        return lambda: calculator.get_accuracy(x, y)
    name, n, d, c, kwargs = LOSS_CASES[case]
    c = max(int(c * scale), 2)
    if impl == "pml":
        from pytorch_metric_learning import losses
    else:
        from metricloss_kernels import pml as losses
    torch.manual_seed(0)
    module = getattr(losses, name)(num_classes=c, embedding_size=d, **kwargs)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    labels = torch.randint(0, c, (n,), generator=g)
    params = [x, *module.parameters()]

    def run():
        for p in params:
            p.grad = None
        module(x, labels).backward()

    return run


def measure_memory(case, impl, scale):
    """Extra peak memory (MB) of one cold call, in this (fresh) process."""
    run = build(case, impl, scale)
    out = {"rss_growth_mb": harness.peak_rss_growth(run)[0] / 2**20}
    if case != "accuracy":  # faiss allocates outside torch: only the RSS growth means something there
        out["torch_alloc_mb"] = harness.peak_torch_bytes(run) / 2**20
    return out


def memory_in_subprocess(case, impl, scale, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory", case, impl, "--scale", str(scale),
           "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join([*LOSS_CASES, "accuracy"]))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies C (losses) and n (accuracy)")
    parser.add_argument("--memory-only", action="store_true", help="skip the timings")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "pml_cpu.json"))
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import faiss
        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    if args._memory:
        print(json.dumps(measure_memory(*args._memory, args.scale)))
        return

    results = {}
    for case in args.cases.split(","):
        entry = {"memory": {impl: memory_in_subprocess(case, impl, args.scale, args.threads)
                            for impl in IMPLEMENTATIONS}}
        if not args.memory_only:
            runs = {impl: build(case, impl, args.scale) for impl in IMPLEMENTATIONS}
            seconds = harness.time_interleaved(runs, args.rounds)
            entry["seconds"] = seconds
            entry["median_s"] = {impl: statistics.median(s) for impl, s in seconds.items()}
            entry["median_speedup"] = statistics.median(p / o for p, o in zip(seconds["pml"], seconds["ours"]))
        results[case] = entry
        print(case, json.dumps(entry, indent=None, default=float), flush=True)
    meta = {**harness.machine_info("cpu"), "scale": args.scale, "rounds": args.rounds,
            "memory_only": args.memory_only,
            "cases": {**{k: dict(zip(("class", "N", "D", "C", "kwargs"), v)) for k, v in LOSS_CASES.items()},
                      "accuracy": ACCURACY_CASE}}
    harness.write_json(args.output, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
