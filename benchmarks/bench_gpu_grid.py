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
    python benchmarks/bench_gpu_grid.py --model-triton                # the Triton kernels' model, docs/architecture.md

--model prints the traffic/FLOP model of docs/benchmarks.md for the same grid, --model-triton that of the Triton
kernels' design in docs/architecture.md: they need no device and time nothing.
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
# H100 SXM as modelled (assumptions, not measurements): HBM 3.35 TB/s; dense peaks 990 TFLOP/s bf16/fp16 and 495
# TF32 on the tensor cores, 67 FP32 without them (torch.mm of fp32 under float32_matmul_precision "highest"); GEMMs
# and bandwidth-bound kernels at EFFICIENCY of peak (cuBLAS reaches ~75-85% on these shapes); data that stays in L2
# between two kernels (a chunk's logits and dL within L2_USABLE of the 50 MB; its G and W rows likewise) moves at
# L2_SPEEDUP x HBM; exponentials at 16 a clock per SM (MUFU), 132 SMs at 1.755 GHz. Host: HOST_TORCH_S per torch
# op and HOST_TRITON_S per Triton launch, overlapped with the GPU (the launches are asynchronous), so a call takes
# the longer of its GPU and host times.
HBM = 3.35e12
PEAK = {"bf16": 990e12, "tf32": 495e12, "fp32": 67e12}
EFFICIENCY = 0.8
L2_SPEEDUP = 3.0
L2_USABLE = 40e6
EXP_RATE = 16 * 132 * 1.755e9
HOST_TORCH_S = 6e-6
HOST_TRITON_S = 12e-6
ARCH = 90  # the Triton tile table's entry for an H100


def _kernel(flops, peak, hbm_bytes=0.0, l2_bytes=0.0, exps=0.0):
    """Modelled seconds of one kernel: the slower of its FLOPs, its bytes and its exponentials."""
    return max(flops / (EFFICIENCY * peak), hbm_bytes / (EFFICIENCY * HBM) + l2_bytes / (EFFICIENCY * L2_SPEEDUP * HBM),
               exps / EXP_RATE)


def gemm_peak(dtype, precision="high") -> float:
    """The peak of torch.mm on operands of `dtype` under float32_matmul_precision `precision`."""
    if dtype != "float32":
        return PEAK["bf16"]
    return PEAK["fp32" if precision == "highest" else "tf32"]


def floor_seconds(d, p, dtype, precision="high") -> float:
    """The floor: the four GEMMs of the row reduction's forward + backward through torch.mm (x W^T twice, dL W,
    dL^T x), each the slower of its FLOPs and its traffic (inputs and the N x P product)."""
    e = 2 if dtype != "float32" else 4
    return 4 * _kernel(2 * N * d * p, gemm_peak(dtype, precision), e * (N * d + p * d + N * p))


def model_triton(d, p, k, dtype, precision="high", split=True) -> float:
    """Modelled forward + backward seconds of the Triton kernels (row reduction) from the tiles they launch with on
    an H100 (triton/_common.tile_config): the forward's one dot per proxy slot (2*N*D*P FLOPs); each backward kernel
    (dX, dW) recomputes the logits once per slice of D it is split into (cdiv(D, block_out)) and adds its gradient
    GEMM, over the proxy slots a class takes, K_HI + K_LO (split, _common.k_parts) or K padded to a power of two in
    one dot (the design before it, whose tiles were those of that power of two). Operands of fp32 run on the tensor
    cores as TF32, three MMAs a product under "highest" (tf32x3); fp16's gradient GEMMs take two (the hi + lo
    pair). Traffic: x and W read once a kernel, the gradients written once; exponentials: the intra-class softmax
    (two a slot forward, one a slot backward) and one per logit for the LSE."""
    import torch
    import triton

    from metricloss_kernels.triton import _common

    torch_dtype = getattr(torch, dtype)
    e = torch_dtype.itemsize
    peak = PEAK["tf32" if dtype == "float32" else "bf16"]
    logit_mmas = 3 if dtype == "float32" and precision == "highest" else 1
    grad_mmas = 2 if dtype == "float16" else logit_mmas
    slots = sum(_common.k_parts(k)) if split else triton.next_power_of_2(k)
    tiles_k = k if split else slots
    tile_precision = ("tf32x3" if precision == "highest" else "tf32") if dtype == "float32" else "ieee"
    c = p // k
    flops = 2 * N * d * c  # a GEMM over one proxy slot a class
    inputs = e * (N * d + p * d)
    seconds = _kernel(logit_mmas * flops * k, peak, inputs + 4 * N, exps=N * c * (1 if k == 1 else 2 * k + 1))
    for kernel, out_bytes in (("dx", 4 * N * d), ("dw", e * p * d)):
        tiles = _common.tile_config(kernel, ARCH, torch_dtype, tile_precision, d, tiles_k)
        slices = triton.cdiv(d, tiles.block_out)
        work = (logit_mmas * slices + grad_mmas) * flops * slots
        seconds += _kernel(work, peak, inputs + out_bytes, exps=slices * N * c * (1 if k == 1 else slots + 1))
    return seconds


def model_case(d, p, k, dtype) -> dict:
    """Modelled forward + backward seconds of the floor, of impl="gemm" (its plan's chunks; block traffic through
    L2 when a chunk's logits and dL fit L2_USABLE, else HBM) and of impl="triton" (model_triton), and the ratios;
    fp32 under "high" (TF32), as the measurement runs."""
    import torch

    from metricloss_kernels import gemm
    from metricloss_kernels.lse import LSESpec

    n, e, peak = N, 2 if dtype == "bfloat16" else 4, gemm_peak(dtype)
    gemm_flops = 2 * n * d * p
    floor = floor_seconds(d, p, dtype)
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
    triton = model_triton(d, p, k, dtype)
    return {"D": d, "P": p, "K": k, "dtype": dtype, "floor_ms": 1e3 * floor, "gemm_gpu_ms": 1e3 * seconds,
            "gemm_host_ms": 1e3 * host, "gemm_gpu_over_floor": seconds / floor,
            "gemm_over_floor": max(seconds, host) / floor, "chunks": chunks, "chunk_proxies": pc,
            "blocks_in_l2": resident, "gemm_extra_mb": extra / 2**20, "triton_ms": 1e3 * triton,
            "triton_over_floor": triton / floor}


def print_model(rows):
    """The model as a Markdown table (docs/benchmarks.md quotes it)."""
    print("| D | P | K | dtype | floor ms | chunks | gemm GPU / floor | gemm / floor (host) | triton / floor |")
    print("|" + "---|" * 9)
    for r in rows:
        print(f"| {r['D']} | {r['P']:.0e} | {r['K']} | {r['dtype']} | {r['floor_ms']:.3f} | {r['chunks']} | "
              f"{r['gemm_gpu_over_floor']:.2f} | {r['gemm_over_floor']:.2f} | {r['triton_over_floor']:.2f} |")


def print_triton_model(d=512):
    """The Triton kernels' model against the floor at the same precision, K padded to a power of two in one dot
    vs split in two (model_triton), as a Markdown table (docs/architecture.md quotes it)."""
    print("| dtype | precision | K | C·K | floor ms | K padded ms | / floor | K split ms | / floor |")
    print("|" + "---|" * 9)
    for dtype, precision in (("bfloat16", "–"), ("float32", "high"), ("float32", "highest")):
        for k in KS:
            for p in sorted(PROXIES):
                floor = floor_seconds(d, p, dtype, precision)
                old, new = (model_triton(d, p, k, dtype, precision, split) for split in (False, True))
                print(f"| {dtype} | {precision} | {k} | {p:.0e} | {1e3 * floor:.3g} | {1e3 * old:.3g} | "
                      f"{old / floor:.2f} | {1e3 * new:.3g} | {new / floor:.2f} |")


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
    parser.add_argument("--model-triton", action="store_true",
                        help="print the Triton kernels' model at D = 512 (K padded vs split) and exit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=100.0, help="start no case after this many seconds")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if args.model_triton:
        print_triton_model()
        return 0
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
