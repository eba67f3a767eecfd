"""The bench command's cases as a pytest-benchmark suite: one benchmark group per case, one entry per
implementation, so that the table puts them side by side (the eager reference, chunked, Triton and gemm on CUDA,
pytorch-metric-learning and faiss where installed): the proxy losses, the op class_lse (both reductions) and kNN.

    METRICLOSS_BENCH=quick pytest benchmarks --benchmark-only [--benchmark-json out.json]
    make bench-compare                      # saves the run and fails on a median more than 10% slower

Each entry's extra_info: the problem size (the case's fields), the implementation, the device, and `peak_mb`, its
peak memory as the bench command measures it (metricloss_kernels/experiments/harness.py): `torch_alloc` for the
proxy losses and the op, `rss_growth` of the first, cold call for kNN. pytest-benchmark times each entry in its own
rounds; the bench command interleaves the implementations round by round, which makes its ratios robust to a changing
load.
"""
from metricloss_kernels.experiments import bench, harness


def _benchmark(benchmark, case, impl, device, rounds, run):
    benchmark.group = case.name
    benchmark.extra_info.update(case.fields, impl=impl, device=device, threads=bench.THREADS)

    def timed():
        run()
        harness.sync(device)

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)


def _benchmark_autograd(benchmark, case, impl, device, rounds):
    run = bench.case_runs(case, [impl], device)[impl]
    _benchmark(benchmark, case, impl, device, rounds, run)
    benchmark.extra_info.update(peak_mb=harness.peak_torch_bytes(run, device) / bench.MB, memory="torch_alloc")


def test_proxy_loss(benchmark, proxy_case, impl, device, rounds):
    """One forward + backward of the loss (gradients of the embeddings and the proxies)."""
    _benchmark_autograd(benchmark, proxy_case, impl, device, rounds)


def test_class_lse(benchmark, op_case, impl, device, rounds):
    """One forward + backward of the op class_lse, its output summed (gradients of x and w): the eager reference
    and each implementation of metricloss_kernels.lse.IMPLS that runs on the device."""
    _benchmark_autograd(benchmark, op_case, impl, device, rounds)


def test_knn(benchmark, knn_case, impl, rounds):
    """One exact top-k search of every query (CPU)."""
    run = bench.case_runs(knn_case, [impl])[impl]
    growth, _ = harness.peak_rss_growth(run)  # before the timed calls: a cold call's memory
    benchmark.extra_info.update(peak_mb=growth / bench.MB, memory="rss_growth")
    _benchmark(benchmark, knn_case, impl, "cpu", rounds, run)
