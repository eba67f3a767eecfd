"""class_lse on the GPU grid of the GEMM-floor target (docs/benchmarks.md): forward + backward of the row reduction
(the row-wise losses' op, both sides normalised, gamma 0.1, scale 16), N = 1024, D in {128, 512}, P = C*K in
{1e4, 1e5, 1e6}, K in {1, 10}, fp32 (TF32: float32_matmul_precision "high", for cuBLAS and Triton alike) and bf16,
for impl="triton", impl="gemm", impl="chunked", the reference where it fits in memory, and the floor: the same four
GEMMs through torch.mm (x W^T twice, dL W, dL^T x, in the inputs' dtype). Side by side in one process, rounds
interleaved: median time, TFLOP/s of 8*N*D*P, extra peak memory of a call, and ratios to the floor.

It ends with the rule for impl="auto" on CUDA the measurement suggests (per D, K and dtype, the P from which "gemm"
was faster than "triton"): docs/benchmarks.md says how that rule is set in metricloss_kernels/lse.py.

    python benchmarks/bench_gpu_grid.py --out grid.json              # on a CUDA machine (benchmarks/gpu_check.sh)
    python benchmarks/bench_gpu_grid.py --dry-run --out /tmp/g.json   # CPU, Triton interpreter, tiny sizes
    python benchmarks/bench_gpu_grid.py --model                       # the modelled ratios to the floor, no device

--model prints the traffic/FLOP model of docs/benchmarks.md for the same grid: it needs no device and times
nothing.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

N = 1024
DIMS = (512, 128)
PROXIES = (10**6, 10**5, 10**4)
KS = (1, 10)
DTYPES = ("bfloat16", "float32")
IMPLS = ("torch.mm", "triton", "gemm", "chunked", "reference")
OP_ARGS = dict(gamma=0.1, scale=16.0, reduce="row")

# ------------------------------------------------------------------------------------------------------ the model
# H100 SXM as modelled (assumptions, not measurements): HBM 3.35 TB/s; dense tensor-core peak 989 TFLOP/s bf16,
# 494.5 TF32; GEMMs and bandwidth-bound kernels at EFFICIENCY of peak (cuBLAS reaches ~75-85% on these shapes);
# data that stays in L2 between two kernels (a chunk's logits and dL within L2_USABLE of the 50 MB; its G and W
# rows likewise) moves at L2_SPEEDUP x HBM; exponentials at 16 a clock per SM (MUFU), 132 SMs at 1.755 GHz. Host:
# HOST_TORCH_S per torch op and HOST_TRITON_S per Triton launch, overlapped with the GPU (the launches are
# asynchronous), so a call takes the longer of its GPU and host times.
HBM = 3.35e12
PEAK = {"bfloat16": 989e12, "float32": 494.5e12}
EFFICIENCY = 0.8
L2_SPEEDUP = 3.0
L2_USABLE = 40e6
EXP_RATE = 16 * 132 * 1.755e9
HOST_TORCH_S = 6e-6
HOST_TRITON_S = 12e-6
# Issue 14's fused kernels, for the row reduction: multiples of N*D*P FLOPs (forward 2; the dX kernel recomputes
# the logits, once more per slot for K > 1, then its dot; the dW kernel likewise) at these fractions of peak (not
# measured: the best case, cuBLAS's, and a fused kernel's more likely one).
TRITON_FLOPS = {1: 2 + 4 + 4, 10: 2 + 6 + 6}
TRITON_EFFICIENCIES = (0.8, 0.5)


def _kernel(flops, peak, hbm_bytes=0.0, l2_bytes=0.0, exps=0.0):
    """Modelled seconds of one kernel: the slower of its FLOPs, its bytes and its exponentials."""
    return max(flops / (EFFICIENCY * peak), hbm_bytes / (EFFICIENCY * HBM) + l2_bytes / (EFFICIENCY * L2_SPEEDUP * HBM),
               exps / EXP_RATE)


def model_case(d, p, k, dtype) -> dict:
    """Modelled forward + backward seconds of the floor, of impl="gemm" (its plan's chunks; block traffic through
    L2 when a chunk's logits and dL fit L2_USABLE, else HBM) and of issue 14's kernels, and the ratios."""
    import torch

    from metricloss_kernels import gemm
    from metricloss_kernels.lse import LSESpec

    n, e, peak = N, 2 if dtype == "bfloat16" else 4, PEAK[dtype]
    gemm_flops = 2 * n * d * p
    floor = 4 * _kernel(gemm_flops, peak, e * (n * d + p * d + n * p))
    torch_dtype = getattr(torch, dtype)
    _, block, chunks, extra = gemm.plan(n, d, p // k, torch_dtype, torch_dtype, LSESpec(centers_per_class=k),
                                        torch.empty(0))
    pc = block * k  # proxies a chunk
    block_bytes = n * pc * (4 + e)  # its logits (fp32) and dL
    resident = block_bytes <= L2_USABLE
    # exponentials per logit: forward 1 (K = 1) or 2 a slot (online softmax); backward that again plus 1 a slot
    exp_fwd, exp_bwd = (1, 2) if k == 1 else (2, 3)
    def traffic(other, block):
        """(HBM bytes, L2 bytes) of a kernel moving `other` bytes from HBM and `block` bytes of logits or dL."""
        return (other, block) if resident else (other + block, 0.0)

    seconds = 0.0
    for c in range(chunks):
        pcc = min(pc, p - c * pc)
        flops, logits, dl, w_c = gemm_flops * pcc / p, n * pcc * 4, n * pcc * e, pcc * d * e
        seconds += 2 * _kernel(flops, peak, *traffic(w_c + n * d * e, logits))  # L = X^ W_c^T, forward, backward
        seconds += _kernel(0, peak, *traffic(0, logits), exps=exp_fwd * n * pcc)  # forward epilogue
        seconds += _kernel(0, peak, *traffic(0, logits + dl), exps=exp_bwd * n * pcc)  # backward epilogue
        seconds += _kernel(flops, peak, *traffic(w_c + n * d * 4, dl))  # dX += dL W_c
        seconds += _kernel(flops, peak, *traffic(n * d * e + pcc * d * 4, dl))  # G = dL^T X^
        # dW: G and W_c in (from L2, where the G GEMM and the dX GEMM left them), dW out
        seconds += _kernel(0, peak, *((pcc * d * e, pcc * d * (4 + e)) if pcc * d * (4 + e) <= L2_USABLE
                                      else (pcc * d * (4 + 2 * e), 0.0)))
    seconds += 2 * _kernel(0, peak, p * d * e)  # W's inverse norms, forward and backward
    # per chunk 4 GEMMs and 3 epilogues; per call the norms (2), the x normalisation and its backward (~10 ops)
    host = chunks * (4 * HOST_TORCH_S + 3 * HOST_TRITON_S) + 2 * HOST_TRITON_S + 10 * HOST_TORCH_S
    triton = {eff: TRITON_FLOPS[1 if k == 1 else 10] * n * d * p / (eff * peak) for eff in TRITON_EFFICIENCIES}
    return {"D": d, "P": p, "K": k, "dtype": dtype, "floor_ms": 1e3 * floor, "gemm_gpu_ms": 1e3 * seconds,
            "gemm_host_ms": 1e3 * host, "gemm_gpu_over_floor": seconds / floor,
            "gemm_over_floor": max(seconds, host) / floor, "chunks": chunks, "chunk_proxies": pc,
            "blocks_in_l2": resident, "gemm_extra_mb": extra / 2**20,
            **{f"triton_{eff}_over_floor": t / floor for eff, t in triton.items()}}


def print_model(rows):
    """The model as a Markdown table (docs/benchmarks.md quotes it)."""
    print("| D | P | K | dtype | floor ms | chunks | gemm GPU / floor | gemm / floor (host) | "
          + " | ".join(f"issue 14 @{e:.0%} / floor" for e in TRITON_EFFICIENCIES) + " |")
    print("|" + "---|" * (8 + len(TRITON_EFFICIENCIES)))
    for r in rows:
        print(f"| {r['D']} | {r['P']:.0e} | {r['K']} | {r['dtype']} | {r['floor_ms']:.3f} | {r['chunks']} | "
              f"{r['gemm_gpu_over_floor']:.2f} | {r['gemm_over_floor']:.2f} | "
              + " | ".join(f"{r[f'triton_{e}_over_floor']:.2f}" for e in TRITON_EFFICIENCIES) + " |")


# ------------------------------------------------------------------------------------------------ measurement
def make_inputs(n, d, p, dtype, device, seed=0):
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=device).to(dtype).requires_grad_()
    w = torch.randn(p, d, generator=g, device=device).to(dtype).requires_grad_()
    return x, w


def make_run(impl, x, w, labels, k):
    """A callable doing one forward + backward of `impl` (the floor: its four GEMMs) on x, w."""
    import torch

    from metricloss_kernels import reference
    from metricloss_kernels.lse import class_lse

    if impl == "torch.mm":
        xd, wd = x.detach(), w.detach()

        def run():
            logits = torch.mm(xd, wd.t())
            dl = torch.mm(xd, wd.t())  # the recomputed forward stands in for dL
            return logits, torch.mm(dl, wd), torch.mm(dl.t(), xd)
        return run
    lse = reference.class_lse if impl == "reference" else lambda *a, **kw: class_lse(*a, impl=impl, **kw)

    def run():
        out = lse(x, w, labels, centers_per_class=k, **OP_ARGS)
        return torch.autograd.grad(out, (x, w), torch.ones_like(out))
    return run


def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def measure_case(n, d, p, k, dtype_name, device, impls, rounds) -> list:
    """Rows for one grid case: every impl timed in interleaved rounds (first call not timed: compilation), then
    its extra peak memory (CUDA); an impl that fails (out of memory, say) gets a row with its error."""
    import torch

    dtype = getattr(torch, dtype_name)
    x, w = make_inputs(n, d, p, dtype, device)
    labels = torch.randint(0, p // k, (n,), device=device)
    base = {"N": n, "D": d, "P": p, "K": k, "C": p // k, "dtype": dtype_name, "flops": 8 * n * d * p}
    runs, rows = {}, {}
    for impl in impls:
        try:
            run = make_run(impl, x, w, labels, k)
            run()
            _sync(device)
            runs[impl] = (run, [])
        except Exception as exc:  # noqa: BLE001 (recorded: OOM for the reference at large P, say)
            rows[impl] = dict(base, impl=impl, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            if device == "cuda":
                torch.cuda.empty_cache()
    for _ in range(rounds):
        for run, times in runs.values():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times.append(time.perf_counter() - start)
    for impl, (run, times) in runs.items():
        seconds = statistics.median(times)
        row = dict(base, impl=impl, time_ms=1e3 * seconds, tflops=base["flops"] / seconds / 1e12)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            row["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        rows[impl] = row
    floor = rows.get("torch.mm", {}).get("time_ms")
    for row in rows.values():
        if floor and "time_ms" in row:
            row["over_floor"] = row["time_ms"] / floor
    return [rows[i] for i in impls if i in rows]


def auto_rule(rows) -> dict:
    """{(D, K, dtype): the smallest measured P from which "gemm" beat "triton" at every larger P, or None}."""
    times = {(r["D"], r["K"], r["dtype"], r["P"], r["impl"]): r["time_ms"] for r in rows if "time_ms" in r}
    rule = {}
    for d, k, dtype in sorted({(r["D"], r["K"], r["dtype"]) for r in rows}):
        ps = sorted(p for (d2, k2, t2, p, i) in times if (d2, k2, t2, i) == (d, k, dtype, "gemm"))
        wins = [p for p in ps if times.get((d, k, dtype, p, "triton"), math.inf) > times[(d, k, dtype, p, "gemm")]]
        start = None
        for p in reversed(ps):
            if p not in wins:
                break
            start = p
        rule[f"D={d} K={k} {dtype}"] = start
    return rule


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file for the rows (and the model)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes, one round")
    parser.add_argument("--model", action="store_true", help="print the modelled ratios to the floor and exit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=100.0, help="start no case after this many seconds")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    model = [model_case(d, p, k, dtype) for d in DIMS for p in sorted(PROXIES) for k in KS for dtype in DTYPES]
    if args.model:
        print_model(model)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"model": model}, f, indent=1)
        return 0
    if args.dry_run:
        device, grid, rounds = "cpu", [(16, 16, p, k, "float32") for p in (64, 128) for k in (1, 4)], 1
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (or --dry-run / --model)")
        torch.set_float32_matmul_precision("high")  # TF32 for cuBLAS and the Triton kernels alike
        device, rounds = "cuda", args.rounds
        grid = [(N, d, p, k, dtype) for d in DIMS for p in PROXIES for k in KS for dtype in DTYPES]
    start, rows, skipped = time.time(), [], []
    for case in grid:
        if time.time() - start > args.budget_s:
            skipped.append(case)
            continue
        case_rows = measure_case(*case, device, args.impls, rounds)
        rows += case_rows
        for r in case_rows:
            print(f"N={r['N']} D={r['D']} P={r['P']:.0e} K={r['K']} {r['dtype']:9s} {r['impl']:10s} "
                  + (f"{r['time_ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s" if "time_ms" in r else r["error"])
                  + (f"  x{r['over_floor']:.2f} floor" if "over_floor" in r else "")
                  + (f"  +{r['peak_extra_mb']:.0f} MB" if "peak_extra_mb" in r else ""), flush=True)
    rule = auto_rule(rows)
    print("impl='auto' rule (P from which gemm beat triton at every larger P; None: never):")
    for key, p in rule.items():
        print(f"  {key}: {p}")
    if args.out:
        info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
                "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "float32_matmul_precision": torch.get_float32_matmul_precision(), "rounds": rounds,
                "command": " ".join(sys.argv)}
        with open(args.out, "w") as f:
            json.dump({"machine": info, "rows": rows, "skipped": skipped, "auto_rule": rule, "model": model}, f,
                      indent=1)
    return 1 if any("error" in r and r["impl"] in ("triton", "gemm", "torch.mm") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
