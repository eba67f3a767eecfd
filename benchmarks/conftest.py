"""Settings of the pytest-benchmark suite (test_bench_cases.py).

METRICLOSS_BENCH selects the sizes of the bench command's grid (metricloss_kernels.experiments.bench.cases): "full"
(the default, the README's sizes) or "quick" (`bench --quick`), of every family of the table (proxy, op, knn; the
command runs the op family only with --family op). The proxy and op cases run on CUDA when it is available, else on
the CPU with bench.THREADS threads, like the command; the run's JSON gets the harness's machine facts.
"""
import os

import pytest
import torch

from metricloss_kernels.experiments import bench, harness

MODES = {"full": False, "quick": True}
QUICK = pytest.StashKey[bool]()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    mode = os.environ.get("METRICLOSS_BENCH", "full")
    if mode not in MODES:
        raise pytest.UsageError(f"METRICLOSS_BENCH must be one of {', '.join(MODES)}; got {mode!r}")
    config.stash[QUICK] = MODES[mode]
    bench.set_threads(bench.THREADS)


def pytest_generate_tests(metafunc):
    """One test per case of the family a test asks for (`proxy_case`, `op_case` or `knn_case`) and implementation;
    those whose optional module is not installed are skipped with the reason."""
    for family in bench.FAMILIES:
        if f"{family}_case" in metafunc.fixturenames:
            grid = bench.cases(DEVICE, metafunc.config.stash[QUICK], families=(family,))
            params = [pytest.param(case, impl, id=f"{case.name}-{impl}",
                                   marks=[pytest.mark.skip(reason=why)] if why else [])
                      for case in grid for impl, why in bench.implementations(case, DEVICE).items()]
            metafunc.parametrize(f"{family}_case,impl", params)


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def rounds(pytestconfig):
    """Timed rounds after one warm-up round, as in the bench command."""
    return bench.ROUNDS[pytestconfig.stash[QUICK]]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    mode = next(name for name, quick in MODES.items() if quick == config.stash[QUICK])
    output_json["metricloss_kernels"] = {"mode": mode, "rounds": bench.ROUNDS[config.stash[QUICK]],
                                         **harness.machine_info(DEVICE)}
