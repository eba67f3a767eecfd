"""impl="gemm" of class_lse (metricloss_kernels.gemm, triton/epilogue.py) beyond the op and loss tests it shares
with the other implementations in test_class_lse.py: equal to the chunked implementation over several chunks, its
plan and memory, and its epilogue kernels compiled offline for sm_80 and sm_90a without register spills.

Without CUDA it runs on CPU tensors under the Triton interpreter (torch.mm for the GEMMs, TRITON_INTERPRET set by
conftest.py).
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from metricloss_kernels import gemm
from metricloss_kernels.lse import LSESpec, class_lse
from utils import TOL, assert_close, proxy_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, C, D = 37, 53, 40


def inputs(k, dtype, bias, seed):
    """utils.proxy_inputs with two labels outside the classes (a shard's rows: nothing left out)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    labels[:2] = torch.tensor([-3, C + 1])
    return proxy_inputs(N, C, k, D, seed=seed, dtype=dtype, bias=bias, labels=labels, device=DEVICE,
                        requires_grad=True)


def value_and_grads(impl, x, w, b, labels, upstream, **kw):
    out = class_lse(x, w, labels, bias=b, impl=impl, **kw)
    leaves = [t for t in (x, w, b) if t is not None]
    return (out, *torch.autograd.grad(out, leaves, upstream.to(out.dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias,normalize", [(True, True), (False, False)], ids=["bias-normalized", "nobias-raw"])
@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("k,pool", [(1, "softmax"), (4, "softmax"), (4, "max")])
def test_gemm_equals_chunked(k, pool, reduce, bias, normalize, dtype):
    """Value, dx, dw and dbias of impl="gemm" (chunks of 13 classes, the last one short; two row blocks) against
    impl="chunked" on the same inputs, within the dtype's tolerance (fp16: both compute in fp32), for both pools."""
    x, w, b, labels = inputs(k, dtype, bias, seed=k + 2 * bias + 4 * normalize)
    if not normalize:
        with torch.no_grad():  # unnormalised dot products: keep z moderate
            x.mul_(0.3), w.mul_(0.3)
    kw = dict(centers_per_class=k, gamma=0.2, scale=6.0, shift=0.4, reduce=reduce, normalize_x=normalize,
              normalize_w=normalize, pool=pool)
    upstream = torch.randn(N if reduce == "row" else C, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = value_and_grads("gemm", x, w, b, labels, upstream, block_classes=13, block_rows=24, **kw)
    want = value_and_grads("chunked", x, w, b, labels, upstream, **kw)
    for name, a, e in zip(("value", "dx", "dw", "dbias"), got, want):
        assert a.dtype == e.dtype, name
        assert_close(a, e, TOL[dtype] if dtype != torch.float16 else 2e-2, name)


def test_plan_keeps_the_extra_memory_in_budget(monkeypatch):
    """As few chunks as fit both budgets: the logits and dL blocks in 32 MB (L2), the call's extra memory (the
    [N, D] buffers, logits and dL per row and class, G per class) in 64 MB + 5% of W's bytes; the last chunk
    short; block_classes overrides the budgets."""
    spec, t = LSESpec(), torch.empty(0)
    for p, dtype in ((10**4, torch.bfloat16), (10**6, torch.bfloat16), (10**6, torch.float32), (10**5, torch.float64)):
        size = torch.empty((), dtype=dtype).element_size()
        acc = max(size, 4)
        memory = 64 * 2**20 + 0.05 * p * 512 * size  # docs/benchmarks.md's target
        fixed, per_row, per_class = 1024 * 512 * (2 * acc + size), 1024 * (acc + size), 512 * acc
        rows, block, chunks, extra = gemm.plan(1024, 512, p, dtype, dtype, spec, t)
        assert rows == 1024 and (chunks - 1) * block < p <= chunks * block
        assert extra == fixed + block * (per_row + per_class) <= memory and block * per_row <= 32 * 2**20
        if chunks > 1:  # one chunk fewer would break a budget
            fewer = math.ceil(p / (chunks - 1))
            assert fixed + fewer * (per_row + per_class) > memory or fewer * per_row > 32 * 2**20
    assert gemm.plan(1024, 512, 10**6, torch.float32, torch.float32, LSESpec(block_classes=300), t)[1:3] == (300,
                                                                                                           3334)
    calls = []
    original = gemm._Pass.logits
    monkeypatch.setattr(gemm._Pass, "logits", lambda self, *a: calls.append(a[0].shape[0]) or original(self, *a))
    monkeypatch.setattr(gemm, "_L2_BLOCK_BYTES", 10 * N * 2 * 8)  # fp32, K = 2: 10 classes a chunk
    xs, ws, _, labels = inputs(2, torch.float32, False, seed=9)
    class_lse(xs.detach(), ws.detach(), labels, centers_per_class=2, impl="gemm")
    assert calls == [18] * 5 + [16]  # 53 classes, 2 proxies each, <= 10 a chunk: 6 chunks of 9 (the last 8)


def test_gpu_grid_benchmark_dry_run(tmp_path):
    """benchmarks/bench_gpu_grid.py end to end on CPU (tiny sizes, the interpreter): rows for each implementation
    and the floor, ratios, the rule for impl="auto", and the model of the real grid."""
    spec = importlib.util.spec_from_file_location("bench_gpu_grid", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_gpu_grid.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "grid.json"
    assert bench.main(["--dry-run", "--impls", "torch.mm", "gemm", "chunked", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["impl"] for r in result["rows"]] == ["torch.mm", "gemm", "chunked"] * 4
    assert all(r["time_ms"] > 0 and r["over_floor"] > 0 for r in result["rows"])
    assert set(result["auto_rule"]) == {"D=16 K=1 float32", "D=16 K=4 float32"}
    assert len(result["model"]) == 24 and all(r["gemm_over_floor"] >= r["gemm_gpu_over_floor"] > 0
                                              and r["triton_over_floor"] > 0 for r in result["model"])
    # the Triton model: K = 10 split into 8 + 2 proxy slots costs less than padded to 16, K = 8 the same
    split, padded = (bench.model_triton(512, 10**5, 10, "bfloat16", split=s) for s in (True, False))
    assert split < padded and bench.model_triton(512, 8 * 10**4, 8, "bfloat16") == bench.model_triton(
        512, 8 * 10**4, 8, "bfloat16", split=False)


# ------------------------------------------------------------------------------------------ offline compile
def compile_epilogues():
    """Compiles every case of epilogue.compile_cases for the report's grid (D in 128, 512; K in 1, 10; both
    reductions; fp32 and bf16) for sm_80 and sm_90a, and runs ptxas -v on each PTX: no spills, no MMA."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    from metricloss_kernels.triton import _common, epilogue

    assert not _common.INTERPRET
    seen = set()
    for arch in (80, 90):
        for d in (128, 512):
            for k in (1, 10):
                for reduce in ("row", "col"):
                    for dtype, precision in ((torch.float32, "tf32"), (torch.bfloat16, "native")):
                        for case in epilogue.compile_cases(d, k, reduce, dtype, precision, arch):
                            key = (arch, case["kernel"], repr(sorted(case["signature"].items())),
                                   repr(sorted(case["constexprs"].items())))
                            if key in seen:
                                continue
                            seen.add(key)
                            assert not case["has_dot"]
                            src = triton.compiler.ASTSource(fn=case["fn"], signature=case["signature"],
                                                            constexprs=case["constexprs"])
                            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(
                                num_warps=case["num_warps"], num_stages=case["num_stages"]))
                            ptx = compiled.asm["ptx"]
                            assert "mma" not in ptx, case["kernel"]
                            with tempfile.TemporaryDirectory() as tmp:
                                path = os.path.join(tmp, "k.ptx")
                                with open(path, "w") as f:
                                    f.write(ptx)
                                log = subprocess.run(
                                    [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                                     path, "-o", os.path.join(tmp, "k.o")],
                                    capture_output=True, text=True, check=True).stderr
                            spills = [int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
                            registers = re.search(r"Used (\d+) registers", log)
                            assert spills and not any(spills), f"{case['kernel']} {case['config']}: {log}"
                            print(f"sm_{arch} {case['kernel']} {case['config']}: {registers.group(1)} registers, "
                                  f"no spills")
    assert len({key[1] for key in seen}) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests run the kernels")
def test_epilogues_compile_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.path.dirname(__file__), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False)
    if "No module named 'triton.backends.nvidia" in run.stderr:
        pytest.skip("triton was built without its NVIDIA backend")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


if __name__ == "__main__":
    compile_epilogues()
