"""The benchmark harness (metricloss_kernels/experiments/harness.py) and the bench command
(metricloss_kernels/experiments/bench.py): what is measured and the results' schema, on tiny sizes. No timing is
asserted."""
import csv
import json
import time

import pytest
import torch

from metricloss_kernels import lse, reference
from metricloss_kernels.experiments import bench, harness
from utils import TOL, assert_close, proxy_inputs


def test_time_interleaved_warms_up_then_rotates_the_order():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = harness.time_interleaved(runs, rounds=3)
    assert calls == list("abc" "bca" "cab" "abc")  # warm-up round, then three rotated rounds
    assert {name: len(ts) for name, ts in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_peak_torch_bytes_counts_temporaries_not_what_lived_before():
    kept = torch.ones(1 << 20)  # 4 MiB allocated before: not counted

    def four_temporaries():
        parts = [kept * i for i in range(4)]  # 4 x 4 MiB live at once
        return sum(p[0] for p in parts)

    peak = harness.peak_torch_bytes(four_temporaries)
    assert 4 * 4 * 2**20 <= peak <= 6 * 4 * 2**20
    assert harness.peak_torch_bytes(lambda: kept.sum()) < 2**16


def test_peak_rss_growth_sees_memory_allocated_outside_torch():
    import numpy as np

    def hold():
        block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
        time.sleep(0.05)
        return block.sum()

    growth, total = harness.peak_rss_growth(hold)
    assert growth >= 48 * 2**20 and total == 64 * 2**20 // 8


def test_machine_info_has_what_a_result_needs():
    info = harness.machine_info("cpu")
    assert {"date", "device", "device_name", "cpu_count", "torch_threads", "versions", "load_average_1min",
            "command", "knn_cpp_op"} <= set(info)
    assert info["versions"]["torch"] == torch.__version__ and "faiss" in info["versions"]


def test_measure_proxy_rows_agree_across_backends():
    case = bench.ProxyCase("soft_triple", 24, 8, 30)
    rows = bench.measure_proxy(case, ["reference", "chunked"], "cpu", rounds=2)
    assert [r["impl"] for r in rows] == ["reference", "chunked"]
    ref, chunked = rows
    assert ref["loss_value"] == pytest.approx(chunked["loss_value"], rel=1e-5)  # the same loss, two backends
    assert ref["K"] == 10 and ref["case"] == case.name and len(ref["times_ms"]) == 2
    assert ref["peak_mb"] > 0 and ref["memory"] == "torch_alloc" and chunked["ratio_to_chunked"] == 1.0


@pytest.mark.parametrize("reduce", lse.REDUCES)
def test_op_runs_compute_the_reference_forward_and_gradients(reduce):
    """The op family's closures on one problem: chunked's output sum and gradients of x and w are the eager
    reference's (the op's own tests check it in depth; this checks what the benchmark times)."""
    case = bench.OpCase(reduce, 37, 40, 53, k=3)
    x, w, _, labels = proxy_inputs(37, 53, 3, 40, dtype=torch.float32, requires_grad=True)
    runs = bench.op_runs(case, ["reference", "chunked"], "cpu", inputs=(x, labels, w))
    results = {impl: (run().detach(), x.grad.clone(), w.grad.clone()) for impl, run in runs.items()}
    for got, want, what in zip(results["chunked"], results["reference"], ("sum", "dx", "dw")):
        assert_close(got, want, TOL[torch.float32], what)
    direct = reference.class_lse(x, w, labels, centers_per_class=3, reduce=reduce, **bench.OP_KWARGS).sum()
    assert_close(results["reference"][0], direct.detach(), TOL[torch.float32], "the case's spec")


def test_op_implementations_are_read_from_the_op_at_run_time(monkeypatch):
    """The op family times every implementation of lse.IMPLS (but "auto") that runs on the device: triton and gemm
    on CUDA only, like the torch.mm floor."""
    case = bench.op_grid("cpu", quick=True)[0]
    assert list(bench.implementations(case, "cpu")) == ["reference", "chunked"]
    monkeypatch.setattr(lse, "IMPLS", ("auto", "chunked", "triton", "gemm"))
    assert list(bench.implementations(case, "cuda")) == ["reference", "chunked", "triton", "gemm", "torch.mm"]
    assert list(bench.implementations(case, "cpu")) == ["reference", "chunked"]


def test_measure_knn_implementations_find_the_same_neighbours():
    rows = bench.measure_knn(bench.KnnCase(60, 500, 8, 4), ["mlk.knn", "torch.mm+topk"], rounds=1, memory=False)
    assert [r["impl"] for r in rows] == ["mlk.knn", "torch.mm+topk"]
    assert all(r["index_agreement_with_mlk.knn"] == 1.0 for r in rows)
    assert "peak_mb" not in rows[0] and rows[0]["R"] == 500


def test_grids_cover_the_design_cases():
    names = [c.name for c in bench.proxy_grid("cpu", quick=False)]
    assert "proxy_anchor_N256_D128_C100000_K1_float32" in names and "soft_triple_N256_D128_C20000_K10_float32" in names
    gpu = bench.proxy_grid("cuda", quick=False)
    assert {c.c * c.k for c in gpu} == {10_000, 100_000, 1_000_000} and {c.dtype for c in gpu} == {"float32",
                                                                                                  "bfloat16"}
    assert bench.knn_grid(quick=False)[-1] == bench.KnnCase(20_000, 100_000, 128, 16)
    assert {c.loss for c in gpu} == {"proxy_anchor", "soft_triple"}
    quick = bench.cases("cpu", quick=True)
    for device in ("cpu", "cuda"):
        assert {c.loss for c in bench.proxy_grid(device, quick=True)} == {"proxy_anchor", "arcface", "soft_triple"}
    ops = [c for c in quick if isinstance(c, bench.OpCase)]
    assert [c.reduce for c in ops] == ["row", "col"] and len({c._replace(reduce="") for c in ops}) == 1  # one size
    assert {c.dtype for c in bench.op_grid("cuda", quick=False)} == {"float32", "bfloat16"}


def test_command_writes_results_with_machine_facts(tmp_path, capsys):
    out = tmp_path / "b"
    code = bench.main(["--family", "proxy", "knn", "--cases", "proxy_anchor_N128_D64_C1000_K1_float32",
                       "knn_Q50_R300_D8_k4", "knn_Q50_R600_D8_k4", "--queries", "50", "--references", "300", "600",
                       "--dim", "8", "--ks", "4", "--rounds", "1", "--quick", "--impls", "reference", "chunked",
                       "mlk.knn", "torch.mm+topk", "--no-plots", "--no-progress", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["machine"]["device"] == "cpu" and result["config"]["rounds"] == 1
    rows = result["rows"]
    assert [(r["family"], r["impl"]) for r in rows] == [("proxy", "reference"), ("proxy", "chunked")] + [
        ("knn", "mlk.knn"), ("knn", "torch.mm+topk")] * 2
    assert all(len(r["load_average_1min"]) == 2 and r["time_ms_median"] > 0 for r in rows)
    table = list(csv.DictReader((out / "results.csv").open()))
    assert len(table) == len(rows) and table[0]["case"] == "proxy_anchor_N128_D64_C1000_K1_float32"
    assert bench.main(["--list", "--quick", "--family", "knn"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "knn_Q1000_R30000_D64_k16"
    assert bench.main(["--list", "--quick"]) == 0  # the op family runs only when asked for
    assert not any(name.startswith("class_lse") for name in capsys.readouterr().out.split())
    assert bench.main(["--list", "--quick", "--family", "op"]) == 0
    assert capsys.readouterr().out.split() == [c.name for c in bench.op_grid("cpu", quick=True)]


def test_unknown_case_is_a_usage_error():
    with pytest.raises(SystemExit):
        bench.main(["--cases", "nonsense", "--no-plots"])


def test_plots_time_and_memory(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{**case.fields, "impl": impl, "time_ms_median": t * case.c, "peak_mb": t * case.c / 10,
             "memory": "torch_alloc"}
            for impl, t in (("reference", 2.0), ("chunked", 1.0))
            for case in (bench.ProxyCase("mpa", 8, 4, 100), bench.ProxyCase("mpa", 8, 4, 1000),
                         bench.OpCase("col", 8, 4, 100))]
    paths = bench.write_plots(rows, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["memory_class_lse_col.png", "memory_mpa.png",
                                                          "time_class_lse_col.png", "time_mpa.png"]
    assert all(open(p, "rb").read(4) == b"\x89PNG" for p in paths)


def _script(name):
    """A script of benchmarks/ as a module (they are entry points, not part of the package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_pml_measures_both_implementations_on_the_harness():
    pytest.importorskip("pytorch_metric_learning")
    bench_pml = _script("bench_pml")
    memory = bench_pml.measure_memory("arcface", "ours", scale=1e-4)
    assert set(memory) == {"rss_growth_mb", "torch_alloc_mb"} and memory["torch_alloc_mb"] > 0
    runs = {impl: bench_pml.build("proxy_anchor", impl, scale=1e-4) for impl in bench_pml.IMPLEMENTATIONS}
    times = harness.time_interleaved(runs, rounds=1)
    assert set(times) == {"pml", "ours"} and all(len(t) == 1 for t in times.values())


def test_bench_train_step_compiled_and_eager_train_alike():
    bench_train_step = _script("bench_train_step")
    args = bench_train_step.argparse.Namespace(batch=16, input_dim=8, hidden=16, embedding_size=8, classes=10,
                                               steps=2, rounds=1)
    row = bench_train_step.run_case("multi_similarity", args)
    assert set(row["steps_per_s"]) == {"eager", "compiled"} and row["compile_s"] > 0
    assert row["loss_difference_after_training"] < 1e-4  # same weights, same batches: the same model after training


def test_pytest_benchmark_suite_runs_the_command_cases_side_by_side(tmp_path):
    """benchmarks/ (pytest-benchmark) on the smallest quick SoftTriple case and the quick class_lse column case: one
    group each, the eager reference and chunked in it, the problem size and peak memory in every entry."""
    pytest.importorskip("pytest_benchmark")
    import os
    import pathlib
    import subprocess
    import sys

    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid = bench.cases(device, quick=True)
    cases = {c.name: c for c in grid if isinstance(c, bench.OpCase) and c.reduce == "col"}
    case = min((c for c in grid if getattr(c, "loss", None) == "soft_triple"), key=lambda c: c.c)
    cases[case.name] = case
    root, out = pathlib.Path(__file__).resolve().parents[2], tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-p", "no:cacheprovider",
                           "-k", f"({' or '.join(cases)}) and (reference or chunked)", "--benchmark-json", str(out)],
                          cwd=root, env={**os.environ, "METRICLOSS_BENCH": "quick"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    entries = json.loads(out.read_text())["benchmarks"]
    assert sorted((e["group"], e["extra_info"]["impl"]) for e in entries) == sorted(
        (name, impl) for name in cases for impl in ("chunked", "reference"))
    for entry in entries:
        assert entry["stats"]["rounds"] == bench.ROUNDS[True]
        assert entry["extra_info"]["peak_mb"] > 0 and entry["extra_info"]["memory"] == "torch_alloc"
        fields = cases[entry["group"]].fields
        assert {k: entry["extra_info"][k] for k in fields} == fields
