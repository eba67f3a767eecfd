"""Exact top-k retrieval on CPU: mlk.knn (the C++ op) vs faiss-cpu IndexFlatIP vs chunked torch.mm + topk.

A thin entry point of `python -m metricloss_kernels bench --family knn` (metricloss_kernels/experiments/bench.py; the
timing and memory method is metricloss_kernels/experiments/harness.py); every option of that command applies:

    python benchmarks/bench_knn.py --out benchmarks/results/knn_cpu                     # Q=20,000, R up to 1e5
    python benchmarks/bench_knn.py --queries 2000 --references 20000 --ks 1 16 --out /tmp/knn
    python benchmarks/bench_knn.py --metric euclidean --references 100000 --ks 1 16 128 \\
        --out benchmarks/results/knn_cpu_euclidean

plus one mode of its own, a sweep of the op's block sizes (METRICLOSS_KNN_BLOCK_Q / _R) at k = 16:

    python benchmarks/bench_knn.py --tune [--queries 4000] [--references 100000] [--rounds 3]
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from metricloss_kernels.experiments import bench, harness  # noqa: E402


def tune(argv):
    parser = argparse.ArgumentParser(prog="bench_knn.py --tune")
    parser.add_argument("--queries", type=int, default=4000)
    parser.add_argument("--references", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = bench.KnnCase(args.queries, args.references, args.dim, 16)
    run = bench.knn_runs(case, ["mlk.knn"])["mlk.knn"]
    for block_q in (64, 128, 256, 512):
        for block_r in (512, 1024, 2048, 4096):
            os.environ["METRICLOSS_KNN_BLOCK_Q"], os.environ["METRICLOSS_KNN_BLOCK_R"] = str(block_q), str(block_r)
            times = harness.time_interleaved({"knn": run}, args.rounds)["knn"]
            print(f"block_q={block_q:4d} block_r={block_r:5d}: median {statistics.median(times):.3f} s  "
                  f"(all {', '.join(f'{t:.3f}' for t in times)})", flush=True)
    return 0


if __name__ == "__main__":
    if "--tune" in sys.argv:
        sys.exit(tune([a for a in sys.argv[1:] if a != "--tune"]))
    sys.exit(bench.main(["--family", "knn", *sys.argv[1:]]))
