"""Offline compile report of every Triton kernel of metricloss_kernels: registers, spills, shared memory and MMA
for sm_80 and sm_90a, at every configuration the launchers can pick. No GPU needed.

    python tools/kernel_report.py --out FILE.json [--keep DIR] [--arch 90] [--D 512] [--K 10] [--reduce row]
                                  [--dtype bfloat16] [--precision native] [--jobs 2]

Every module of `metricloss_kernels.triton` that defines `compile_cases(D, K, reduce, dtype, precision, arch)` is
asked for its cases over the grid (D in {64, 128, 256, 512}, K in {1, 10}, reduce in {row, col}, float32 under
"tf32x3" and "tf32", bfloat16 and float16 "native"; the options narrow it); each distinct case is compiled once
with triton.compile for the target, and ptxas's `-v` report (the options triton itself passes) gives the registers
and the spill bytes (stores + loads). Pointers, `D` and the `stride_*` arguments are taken as multiples of 16, as
the launcher specialises them for contiguous rows of D in the grid. JSON:
    {"triton": version, "entries": [{"kernel", "arch", "dtype", "precision", "D", "K", "reduce", "config",
     "registers", "spill_bytes", "shared_bytes", "mma", "ptx"}]}
mma: the PTX holds mma.sync or wgmma (null for a kernel without a dot); ptx: the file name under --keep.
Exit status 1 when a kernel with a dot has no MMA, spills (more than 1 KiB at D = 512, anything below), needs more
shared memory than its target has, or fails to compile. Runs without TRITON_INTERPRET (it re-runs itself with the
variable unset).
"""
import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import pkgutil
import re
import sys
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS, KS, REDUCES, ARCHS = (64, 128, 256, 512), (1, 10), ("row", "col"), (80, 90)
PRECISIONS = {"float32": ("tf32x3", "tf32"), "bfloat16": ("native",), "float16": ("native",)}


def spill_limit(d: int) -> int:
    """Spill bytes allowed: none up to D = 256, 1 KiB beyond."""
    return 0 if d <= 256 else 1024


def shared_limit(arch: int) -> int:
    """Shared memory bytes a program may use on `arch`: 227 KiB on sm_90a; 99 KiB for 80, which stands for every
    sm_8x (sm_86 and sm_89 have 99 KiB, sm_80 163): a launch asking for more fails."""
    return (227 if arch == 90 else 99) * 1024


def kernel_modules():
    """Every module of metricloss_kernels.triton that defines compile_cases."""
    import metricloss_kernels.triton as package
    modules = (importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__))
    return [m for m in modules if hasattr(m, "compile_cases")]


def case_key(case: dict, arch: int) -> str:
    """Identity of one compilation: the kernel, the target, its specialisation and launch options."""
    text = repr((case["fn"].__module__, case["kernel"], arch, sorted(case["signature"].items()),
                 sorted((k, str(v)) for k, v in case["constexprs"].items()), case["num_warps"], case["num_stages"]))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def compile_one(module: str, kernel: str, case_args: tuple, index: int, arch: int, keep: str | None) -> dict:
    """Compile case `index` of module.compile_cases(*case_args) for `arch` (run in a worker: JITFunctions are
    re-created from their module there). Returns the measured fields."""
    import triton
    from triton.backends.compiler import GPUTarget

    case = importlib.import_module(module).compile_cases(*case_args)[index]
    assert case["kernel"] == kernel
    fn, sig = case["fn"], case["signature"]
    divisible = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if sig[a] != "constexpr" and (sig[a].startswith("*") or a == "D" or a.startswith("stride_"))}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=case["constexprs"], attrs=divisible)
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v, as triton runs it, printed to stdout
    triton.knobs.compilation.always_compile = True  # a cached kernel would skip ptxas
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=case["num_warps"], num_stages=case["num_stages"]))
    except Exception as exc:  # reported, and fails the run
        return {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    ptx = compiled.asm["ptx"]
    name = f"{kernel}-sm{arch}-{case_key(case, arch)}.ptx"
    if keep:
        with open(os.path.join(keep, name), "w") as f:
            f.write(ptx)
    has_mma = "mma.sync" in ptx or "wgmma" in ptx
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) + int(spill.group(2)) if spill else None,
            "shared_bytes": compiled.metadata.shared, "mma": has_mma if case["has_dot"] else None, "ptx": name}


def grid(args):
    for arch in args.arch:
        for dtype in args.dtype:
            for precision in (p for p in PRECISIONS[dtype] if p in args.precision):
                for d in args.D:
                    for k in args.K:
                        for reduce in args.reduce:
                            yield arch, dtype, precision, d, k, reduce


def problems(entry: dict) -> list[str]:
    """What is wrong with one entry (empty: fine)."""
    if "error" in entry:
        return ["does not compile"]
    bad = []
    if entry["mma"] is False:
        bad.append("no MMA instruction")
    if entry["spill_bytes"] is None or entry["spill_bytes"] > spill_limit(entry["D"]):
        bad.append(f"spills {entry['spill_bytes']} bytes")
    if entry["shared_bytes"] > shared_limit(entry["arch"]):
        bad.append(f"needs {entry['shared_bytes']} bytes of shared memory")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON report to write")
    parser.add_argument("--keep", help="directory for the PTX of every compiled case")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--D", type=int, nargs="+", default=list(DS))
    parser.add_argument("--K", type=int, nargs="+", default=list(KS))
    parser.add_argument("--reduce", nargs="+", default=list(REDUCES), choices=REDUCES)
    parser.add_argument("--dtype", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--precision", nargs="+", default=["native", "tf32x3", "tf32"],
                        choices=["native", "tf32x3", "tf32"])
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):  # the kernels must be decorated for the compiler, not the interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    sys.path.insert(0, ROOT)
    import torch
    import triton

    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    entries, jobs = [], {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for arch, dtype, precision, d, k, reduce in grid(args):
            case_args = (d, k, reduce, getattr(torch, dtype), precision, arch)
            for module in kernel_modules():
                for index, case in enumerate(module.compile_cases(*case_args)):
                    key = case_key(case, arch)
                    if key not in jobs:
                        jobs[key] = pool.submit(compile_one, module.__name__, case["kernel"], case_args, index, arch,
                                                args.keep)
                    entries.append((key, {"kernel": case["kernel"], "arch": arch, "dtype": dtype,
                                          "precision": precision, "D": d, "K": k, "reduce": reduce,
                                          "config": case["config"]}))
        results = {key: job.result() for key, job in jobs.items()}
    report = [dict(entry, **results[key]) for key, entry in entries]
    with open(args.out, "w") as f:
        json.dump({"triton": triton.__version__, "entries": report}, f, indent=1)
    failed = 0
    for entry in report:
        bad = problems(entry)
        failed += bool(bad)
        if bad:
            print(f"{entry['kernel']} sm_{entry['arch']} {entry['dtype']}/{entry['precision']} D={entry['D']} "
                  f"K={entry['K']} {entry['reduce']}: {', '.join(bad)} {entry.get('error', '')}")
    print(f"{len(report)} entries ({len(results)} compilations), {failed} with problems -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
