"""Proxy losses, forward + backward: reference vs chunked vs Triton (CUDA) vs pytorch-metric-learning, across C.

A thin entry point of `python -m metricloss_kernels bench --family proxy` (metricloss_kernels/experiments/bench.py;
the timing and memory method is metricloss_kernels/experiments/harness.py); every option of that command applies:

    python benchmarks/bench_proxy_losses.py --out benchmarks/results/proxy_cpu          # CPU grid, 2 threads
    python benchmarks/bench_proxy_losses.py --device cuda --out benchmarks/results/proxy_cuda
    python benchmarks/bench_proxy_losses.py --list                                      # the grid's case names
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from metricloss_kernels.experiments.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--family", "proxy", *sys.argv[1:]]))
