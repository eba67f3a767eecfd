#!/usr/bin/env bash
# One-shot check on a lent GPU machine (H100/H200; its own torch + triton; no network). Run from the repository
# root:   bash benchmarks/gpu_check.sh        (results under $OUT, default ./gpu_check_out)
#
# Steps, in order of importance, each under `timeout` and a global deadline (GPU_CHECK_BUDGET seconds, default
# 530, so the whole run stays under ~9 minutes); a failing or timed-out step is recorded and the next one runs:
#   info        nvidia-smi, python/torch/triton/CUDA versions, mlk.backends()         -> device.txt
#   install     pip install --no-build-isolation --no-deps -e .  (the C++ op; on failure the tree is used via
#               PYTHONPATH, knn then takes its torch fallback)                          -> logs/install.log
#   kernel_report  tools/kernel_report.py: registers, spills, MMA of every kernel config -> kernel_report.json
#   pytest_gpu  the test files with CUDA tests, without TRITON_INTERPRET               -> pytest_gpu.xml, logs/
#   bench_time  `python -m metricloss_kernels bench --device cuda --family proxy`, one process per case of its
#               GPU grid (N=1024, D=512, P=1e4..1e6, fp32 and bf16): times, TFLOP/s, the torch.mm floor; no
#               memory measurement                                                    -> bench/<case>/results.json
#   pytest_rest the rest of `pytest tests` (CPU tests, on a machine where CUDA is visible) -> pytest_rest.xml
#   bench_mem   peak CUDA memory of triton and reference at P=1e6 (if time is left)   -> bench/mem_<case>/
#   knn         `bench --family knn`, a short CPU run on this host (its op has no CUDA kernel; only if faiss
#               imports)                                                              -> bench/knn_cpu_gpuhost/
#   summary     summary.json: every step's status and time, unexpected skips, Triton vs torch.mm per case,
#               bench/proxy_cuda/results.json (the timing cases merged, the bench command's format) and its
#               PNG plots when matplotlib imports
# Environment: OUT, GPU_CHECK_BUDGET (seconds), GPU_CHECK_ROUNDS (timing rounds, default 5), GPU_CHECK_CASES
# (space-separated case names of `bench --device cuda --list`, default all), PYTHON (default: python3 or python,
# whichever imports torch).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET:-530}
ROUNDS=${GPU_CHECK_ROUNDS:-5}
mkdir -p "$OUT/logs" "$OUT/bench"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\trc\tseconds\tlimit\n' > "$STEPS"
unset TRITON_INTERPRET  # the kernels must compile for the GPU, not run in the interpreter

PY=${PYTHON:-}
for candidate in python3 python; do
    [ -n "$PY" ] && break
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then PY=$candidate; fi
done
PY=${PY:-python3}

remaining() { echo $((DEADLINE - $(date +%s))); }

# step NAME CAP MIN_NEEDED CMD...: runs CMD under timeout min(CAP, time left - reserve), output to logs/NAME.log;
# skipped when less than MIN_NEEDED seconds are left. RESERVE (seconds kept for later steps) is read from the
# environment of the call.
step() {
    local name=$1 cap=$2 min_needed=$3
    shift 3
    local left=$(( $(remaining) - ${RESERVE:-0} ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt "$min_needed" ]; then
        printf '%s\tskipped\t-\t0\t%s\n' "$name" "$limit" >> "$STEPS"
        echo "== $name: skipped (${limit}s left for it)"
        return 125
    fi
    echo "== $name (limit ${limit}s)"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    local rc=$?
    local status=ok
    [ $rc -ne 0 ] && status=failed
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" $(( $(date +%s) - t0 )) "$limit" >> "$STEPS"
    echo "   $status (rc $rc, $(( $(date +%s) - t0 ))s)"
    tail -n 3 "$OUT/logs/$name.log" | sed 's/^/   | /'
    return $rc
}

# ------------------------------------------------------------------------------------------------------- info
info() {
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
    echo "nproc: $(nproc)"; free -g | head -2
    "$PY" - <<'EOF'
import platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory_GiB", round(p.total_memory / 2**30, 1))
print("float32_matmul_precision", torch.get_float32_matmul_precision())
for mod in ("triton", "pytest", "numpy", "faiss", "pytorch_metric_learning", "sklearn", "setuptools"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as exc:
        print(mod, "NOT AVAILABLE", type(exc).__name__, exc)
EOF
}
export -f info
export PY
step info 30 5 bash -c info
cp "$OUT/logs/info.log" "$OUT/device.txt"

# ---------------------------------------------------------------------------------------------------- install
RESERVE=300 step install 150 20 "$PY" -m pip install --no-build-isolation --no-deps -e . \
    || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import metricloss_kernels as m; print('backends', m.backends()); print('knn C++ op', m.has_extension())" \
    >> "$OUT/device.txt" 2>&1

# ------------------------------------------------------------------------- offline compile report (sm_80, sm_90a)
# Registers, spills and MMA of every Triton kernel at every configuration its launcher picks (tools/kernel_report.py).
RESERVE=300 step kernel_report 120 30 "$PY" tools/kernel_report.py --out "$OUT/kernel_report.json" --jobs 8

# ------------------------------------------------------------------------------------------- tests with CUDA
GPU_TESTS="tests/test_class_lse.py tests/test_compile.py tests/test_autocast.py tests/test_knn.py tests/test_api.py"
# shellcheck disable=SC2086
RESERVE=150 step pytest_gpu 210 30 "$PY" -m pytest $GPU_TESTS -rs --durations=15 -p no:cacheprovider \
    --junitxml="$OUT/pytest_gpu.xml"

# ----------------------------------------------------------------------------------- proxy-loss benchmark, GPU
# The bench command records an implementation that fails as a row with "error" (and then exits 1): check the file.
BENCH=("$PY" -m metricloss_kernels bench --device cuda --family proxy --no-plots --no-progress)
bench_ok() {
    "$PY" -c "import json, sys; rows = json.load(open(sys.argv[1]))['rows']
sys.exit(0 if rows and not any('error' in r for r in rows) else 1)" "$1" 2>/dev/null
}
bench() {  # bench NAME CAP CASE [bench options...]
    local name=$1 cap=$2 case=$3
    shift 3
    if RESERVE=90 step "$name" "$cap" 15 "${BENCH[@]}" --cases "$case" --rounds "$ROUNDS" --no-memory \
            --out "$OUT/bench/$case" "$@"; then
        bench_ok "$OUT/bench/$case/results.json" && return 0
        printf '%s\terror_in_json\t0\t0\t0\n' "$name" >> "$STEPS"
    fi
    return 1
}
CASES=${GPU_CHECK_CASES:-$("${BENCH[@]}" --list 2>"$OUT/logs/bench_cases.log" | tr '\n' ' ')}
[ -z "$CASES" ] && printf 'bench_cases\tfailed\t-\t0\t0\n' >> "$STEPS"
# The timing grid gets at most 170 s, and leaves 90 s for the rest of the test suite.
BENCH_END=$(( $(date +%s) + 170 ))
for case in $CASES; do
    left=$(( BENCH_END - $(date +%s) ))
    [ "$left" -gt 60 ] && left=60
    bench "bench_$case" "$left" "$case" && continue
    [ $(( BENCH_END - $(date +%s) )) -lt 30 ] && continue
    # One implementation that fails (pytorch-metric-learning in bf16, say) fails the whole case: retry without
    # it, then Triton alone (with the torch.mm floor, which the script always adds on CUDA).
    bench "bench_${case}_ours" 40 "$case" --impls reference chunked triton \
        || bench "bench_${case}_triton" 30 "$case" --impls triton
done
RESERVE=90 step bench_gpu_grid 150 40 "$PY" benchmarks/bench_gpu_grid.py --rounds "$ROUNDS" --out "$OUT/gpu_grid.json"

# -------------------------------------------------------------------------------------------- rest of the suite
REST_IGNORE=""
for f in $GPU_TESTS; do REST_IGNORE="$REST_IGNORE --ignore=$f"; done
# shellcheck disable=SC2086
RESERVE=10 step pytest_rest 240 30 "$PY" -m pytest tests -rs --durations=10 -p no:cacheprovider $REST_IGNORE \
    --junitxml="$OUT/pytest_rest.xml"

# ------------------------------------------------------------------------- peak memory at P = 1e6 (optional)
for case in proxy_anchor_N1024_D512_C1000000_K1_bfloat16 soft_triple_N1024_D512_C100000_K10_bfloat16; do
    RESERVE=40 step "mem_$case" 40 25 "${BENCH[@]}" --cases "$case" --rounds 1 --impls triton reference \
        --out "$OUT/bench/mem_$case"
done

# ---------------------------------------------------------------------------------------- kNN (CPU of this host)
if "$PY" -c "import faiss" 2>/dev/null; then
    RESERVE=15 step knn 60 30 "$PY" -m metricloss_kernels bench --family knn --queries 4000 --references 100000 \
        --ks 1 16 --rounds 2 --no-plots --no-progress --out "$OUT/bench/knn_cpu_gpuhost"
else
    printf 'knn\tskipped\t-\t0\t0\n' >> "$STEPS"
    echo "== knn: skipped (faiss does not import)"
fi

# ---------------------------------------------------------------------------------------------------- summary
"$PY" - "$OUT" <<'EOF' || echo "summary failed"
import csv, glob, json, os, re, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]
summary = {"steps": list(csv.DictReader(open(os.path.join(out, "steps.tsv")), delimiter="\t"))}
# Skips on a GPU: only the offline sm_90a compile check (it runs where CUDA is absent) is expected.
expected_skip = re.compile(r"test_triton_kernels_compile_for_hopper")
for name in ("pytest_gpu", "pytest_rest"):
    path = os.path.join(out, name + ".xml")
    if not os.path.exists(path):
        continue
    tests = list(ET.parse(path).getroot().iter("testcase"))
    outcome = lambda t: next((c.tag for c in t if c.tag in ("failure", "error", "skipped")), "passed")
    summary[name] = {
        "counts": {k: sum(outcome(t) == k for t in tests) for k in ("passed", "failure", "error", "skipped")},
        "not_passed": [f"{t.get('classname')}::{t.get('name')}: {outcome(t)}" for t in tests
                       if outcome(t) in ("failure", "error")],
        "unexpected_skips": [f"{t.get('classname')}::{t.get('name')}: {t.find('skipped').get('message')}"
                             for t in tests if outcome(t) == "skipped" and not expected_skip.search(t.get("name"))],
    }
merged, rows = None, []
for path in sorted(glob.glob(os.path.join(out, "bench", "*", "results.json"))):
    if os.path.basename(os.path.dirname(path)).startswith(("mem_", "knn", "proxy_cuda")):
        continue
    data = json.load(open(path))
    merged = merged or {k: v for k, v in data.items() if k != "rows"}
    rows += data["rows"]
if merged:
    merged["rows"] = rows
    merged["machine"]["command"] = "benchmarks/gpu_check.sh (one bench process per case, --no-memory)"
    os.makedirs(os.path.join(out, "bench", "proxy_cuda"), exist_ok=True)
    json.dump(merged, open(os.path.join(out, "bench", "proxy_cuda", "results.json"), "w"), indent=1)
by_case = {}
for row in rows:
    by_case.setdefault(row["case"], []).append(row)
table = []
for case, case_rows in by_case.items():
    ms = {r["impl"]: r["time_ms_median"] for r in case_rows if "time_ms_median" in r}
    errors = {r["impl"]: r["error"] for r in case_rows if "error" in r}
    entry = {"case": case, "error": errors or None, "median_ms": ms,
             "triton_tflops": next((r["tflops"] for r in case_rows if r["impl"] == "triton" and "tflops" in r), None)}
    if "triton" in ms and "torch.mm" in ms:
        entry["triton_over_mm_floor"] = ms["triton"] / ms["torch.mm"]  # target (docs/benchmarks.md#targets): <= 1.5
    if "triton" in ms and "reference" in ms:
        entry["reference_over_triton"] = ms["reference"] / ms["triton"]  # target (docs/benchmarks.md#targets): >= 3
    table.append(entry)
summary["proxy_losses"] = table
for path in glob.glob(os.path.join(out, "bench", "mem_*", "results.json")):
    for row in json.load(open(path))["rows"]:
        summary.setdefault("peak_memory_mb", {}).setdefault(row["case"], {})[row["impl"]] = row.get(
            "peak_mb", row.get("error"))
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
for entry in table:
    print(f"{entry['case']:34s} " + "  ".join(f"{k} {v:.2f} ms" for k, v in entry["median_ms"].items())
          + (f"  triton/mm {entry['triton_over_mm_floor']:.2f}" if "triton_over_mm_floor" in entry else "")
          + (f"  ERROR {entry['error']}" if entry["error"] else ""))
for name in ("pytest_gpu", "pytest_rest"):
    if name in summary:
        print(name, summary[name]["counts"], "unexpected skips:", len(summary[name]["unexpected_skips"]))
EOF
if [ -f "$OUT/bench/proxy_cuda/results.json" ]; then  # PNGs when matplotlib is installed on this host
    "$PY" -m metricloss_kernels bench --plot-only "$OUT/bench/proxy_cuda/results.json" --out "$OUT/bench/proxy_cuda" \
        > "$OUT/logs/plots.log" 2>&1 || echo "no plots (see logs/plots.log)"
fi
echo "total $(( $(date +%s) - START ))s; results in $OUT"
column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
