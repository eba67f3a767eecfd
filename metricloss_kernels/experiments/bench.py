"""The benchmark grid: `python -m metricloss_kernels bench [--quick] [--out DIR]`.

- proxy family: forward + backward of a proxy loss (gradients w.r.t. the embeddings and the proxies, as in
  training) through the public API, `functional.<loss>(..., backend=B)` for B in reference, chunked, triton (CUDA
  only: the Triton interpreter is a correctness tool, not a speed one), against pytorch-metric-learning's class of
  the same name when it is installed and, on CUDA, the floor: the same four GEMMs (forward, recomputed forward, dX,
  dW) through torch.mm. Across the number of classes C.
- op family: forward + backward of the streaming primitive, the registered op `class_lse` (metricloss_kernels.lse),
  both reductions at one size: the eager reference (metricloss_kernels.reference.class_lse) and each implementation
  of `lse.IMPLS` (chunked; triton and gemm on CUDA only), and the torch.mm floor on CUDA. Not in the command's
  default families (`--family op`); the pytest-benchmark suite runs it.
- knn family (CPU): exact top-k by `mlk.knn` (the C++ op when built) against faiss-cpu's IndexFlatIP when it is
  installed and chunked torch.mm + topk, across the number of references R.

Writes results.json (machine facts, configuration, one row per case and implementation), results.csv (the same
rows) and PNG plots of time and peak memory (log scales) into --out. Timing method and memory definitions:
metricloss_kernels/experiments/harness.py; docs/benchmarks.md. The pytest-benchmark suite (benchmarks/, `pytest
benchmarks --benchmark-only`) runs the same cases (`cases`) and implementations (`implementations`, `case_runs`).
"""
import argparse
import csv
import json
import os
import statistics
from typing import NamedTuple

import torch

from .. import functional as F
from .. import lse
from ..reference import class_lse as reference_class_lse
from ..retrieval import knn
from . import harness

# name -> (functional name, pytorch-metric-learning class or None, keyword arguments shared by both, K)
PROXY_LOSSES = {
    "proxy_anchor": ("proxy_anchor_loss", "ProxyAnchorLoss", {"margin": 0.1, "alpha": 32.0}, 1),
    "proxy_nca": ("proxy_nca_loss", "ProxyNCALoss", {}, 1),
    "arcface": ("arcface_loss", "ArcFaceLoss", {"margin": 28.6, "scale": 64.0}, 1),
    "cosface": ("cosface_loss", "CosFaceLoss", {"margin": 0.35, "scale": 64.0}, 1),
    "soft_triple": ("soft_triple_loss", "SoftTripleLoss", {"la": 20.0, "gamma": 0.1, "margin": 0.01}, 10),
    "mpa": ("mpa_loss", None, {"alpha": 32.0, "margin": 0.1, "gamma": 0.1}, 10),
}
PROXY_IMPLS = ("reference", "chunked", "triton", "pml")
# the Triton interpreter is a correctness tool (gemm's epilogues are Triton kernels too); torch.mm is the CUDA floor
CUDA_ONLY = ("triton", "gemm", "torch.mm")
OP_KWARGS = {"scale": 32.0}  # class_lse's logits z = 32 cos, ProxyAnchor's alpha
# per kNN metric: our op, faiss's exact index, the chunked torch baseline; euclidean also times our op with
# metric="dot" on the same data: that row's ratio_to_mlk.knn is time(dot) / time(euclidean), the inverse of the
# cost of the exact euclidean search (centring, error-bounded candidate window, fp64 re-rank) under the same load
KNN_IMPLS_BY_METRIC = {"dot": ("mlk.knn", "faiss.IndexFlatIP", "torch.mm+topk"),
                       "euclidean": ("mlk.knn", "faiss.IndexFlatL2", "torch.cdist+topk", "mlk.knn[dot]")}
KNN_IMPLS = tuple(dict.fromkeys(i for impls in KNN_IMPLS_BY_METRIC.values() for i in impls))
# implementation -> the optional module it needs (harness.OPTIONAL)
NEEDS = {"pml": "pytorch_metric_learning", "faiss.IndexFlatIP": "faiss", "faiss.IndexFlatL2": "faiss"}
FAMILIES = ("proxy", "op", "knn")
COMMAND_FAMILIES = ("proxy", "knn")  # what the bench command runs unless --family says otherwise
ROUNDS = {False: 5, True: 3}  # timed rounds after the warm-up, by `quick`
THREADS = 2  # CPU threads of torch and faiss: the design's CPU setting
MB = 2 ** 20


class ProxyCase(NamedTuple):
    loss: str
    n: int
    d: int
    c: int
    dtype: str = "float32"

    @property
    def k(self) -> int:
        return PROXY_LOSSES[self.loss][3]

    @property
    def name(self) -> str:
        return f"{self.loss}_N{self.n}_D{self.d}_C{self.c}_K{self.k}_{self.dtype}"

    @property
    def fields(self) -> dict:
        """The case and its problem size, as a result row names them."""
        return {"family": "proxy", "case": self.name, "loss": self.loss, "N": self.n, "D": self.d, "C": self.c,
                "K": self.k, "dtype": self.dtype}


class OpCase(NamedTuple):
    reduce: str
    n: int
    d: int
    c: int
    k: int = 1
    dtype: str = "float32"

    @property
    def name(self) -> str:
        return f"class_lse_{self.reduce}_N{self.n}_D{self.d}_C{self.c}_K{self.k}_{self.dtype}"

    @property
    def fields(self) -> dict:
        """The case and its problem size, as a result row names them."""
        return {"family": "op", "case": self.name, "op": "class_lse", "reduce": self.reduce, "N": self.n,
                "D": self.d, "C": self.c, "K": self.k, "dtype": self.dtype}


class KnnCase(NamedTuple):
    queries: int
    references: int
    dim: int
    k: int
    metric: str = "dot"

    @property
    def name(self) -> str:
        suffix = "" if self.metric == "dot" else f"_{self.metric}"
        return f"knn_Q{self.queries}_R{self.references}_D{self.dim}_k{self.k}{suffix}"

    @property
    def fields(self) -> dict:
        """The case and its problem size, as a result row names them."""
        return {"family": "knn", "case": self.name, "Q": self.queries, "R": self.references, "D": self.dim,
                "k": self.k, "metric": self.metric}


# CPU sizes: classes C per (quick, K); the K = 10 losses get a tenth of the classes (the same C*K proxies)
_CPU_CLASSES = {(False, 1): (1_000, 10_000, 100_000), (False, 10): (200, 2_000, 20_000),
                (True, 1): (1_000, 10_000, 30_000), (True, 10): (100, 1_000, 3_000)}


def _dtypes(device: str, quick: bool) -> tuple:
    return ("float32", "bfloat16") if device == "cuda" and not quick else ("float32",)


def _rows_and_width(device: str, quick: bool) -> tuple:
    """(N, D) of the proxy and op cases."""
    return (1024, 512) if device == "cuda" else (128, 64) if quick else (256, 128)


def proxy_grid(device: str, quick: bool, losses=None) -> list:
    """CPU: N=256, D=128, C*K from 1e3 to 2e5 (at the top: the CPU targets of docs/benchmarks.md#targets);
    quick: N=128, D=64, C*K up to 3e4. CUDA: N=1024, D=512, C*K from 1e4 to 1e6, fp32 and bf16, ProxyAnchor and
    SoftTriple (quick: up to 1e5, fp32). Quick, on either device: ProxyAnchor, ArcFace and SoftTriple."""
    quick_losses = ("proxy_anchor", "arcface", "soft_triple")
    n, d = _rows_and_width(device, quick)
    if device == "cuda":
        losses = losses or (quick_losses if quick else ("proxy_anchor", "soft_triple"))
        sizes = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)
        return [ProxyCase(loss, n, d, p // PROXY_LOSSES[loss][3], dtype)
                for dtype in _dtypes(device, quick) for loss in losses for p in sizes]
    default = quick_losses if quick else ("proxy_anchor", "proxy_nca", "arcface", "soft_triple", "mpa")
    return [ProxyCase(loss, n, d, c) for loss in losses or default
            for c in _CPU_CLASSES[(quick, PROXY_LOSSES[loss][3])]]


def op_grid(device: str, quick: bool) -> list:
    """class_lse, K = 1, both reductions at one size: the proxy grid's N and D (CPU 256 x 128, quick 128 x 64; CUDA
    1024 x 512) with C = 1e5 (CPU quick: 1e4; CUDA: 1e6, quick 1e5), fp32 (CUDA: and bf16, quick fp32)."""
    n, d = _rows_and_width(device, quick)
    c = {("cpu", False): 100_000, ("cpu", True): 10_000, ("cuda", False): 1_000_000, ("cuda", True): 100_000}
    return [OpCase(reduce, n, d, c[device, quick], dtype=dtype)
            for dtype in _dtypes(device, quick) for reduce in lse.REDUCES]


def knn_grid(quick: bool, queries=None, references=None, dim=None, ks=None, metric="dot") -> list:
    """Q=20,000 x R in {1e4, 3e4, 1e5} x D=128, k=16 (the kNN target of docs/benchmarks.md#targets at R=1e5);
    quick: Q=1,000, R up to 3e4, D=64."""
    queries = queries or (1_000 if quick else 20_000)
    references = references or ((10_000, 30_000) if quick else (10_000, 30_000, 100_000))
    dim = dim or (64 if quick else 128)
    return [KnnCase(queries, r, dim, k, metric) for k in (ks or (16,)) for r in references]


def cases(device="cpu", quick=False, families=FAMILIES, losses=None, **knn_sizes) -> list:
    """The one table of cases, read by the bench command and by the pytest-benchmark suite
    (benchmarks/test_bench_cases.py): the proxy and op cases on `device`, then the kNN cases (CPU). knn_sizes:
    knn_grid's queries, references, dim, ks and metric."""
    grid = proxy_grid(device, quick, losses) if "proxy" in families else []
    grid += op_grid(device, quick) if "op" in families else []
    return grid + (knn_grid(quick, **knn_sizes) if "knn" in families else [])


def op_impls() -> tuple:
    """The eager reference, then every implementation the op has now (`lse.IMPLS` but "auto")."""
    return ("reference", *(i for i in lse.IMPLS if i != "auto"))


def implementations(case, device="cpu") -> dict:
    """{implementation: None, or why it cannot run here} for every implementation `case` has on `device`, in the
    rows' order: Triton, gemm and the torch.mm floor on CUDA only, pytorch-metric-learning where it has the loss,
    for the op those of `op_impls`, for kNN the implementations of the case's metric; those whose optional module is
    not installed say so."""
    if isinstance(case, KnnCase):
        impls = KNN_IMPLS_BY_METRIC[case.metric]
    else:
        ours = op_impls() if isinstance(case, OpCase) else [
            i for i in PROXY_IMPLS if i != "pml" or PROXY_LOSSES[case.loss][1] is not None]
        impls = [i for i in (*ours, "torch.mm") if device == "cuda" or i not in CUDA_ONLY]
    return {i: f"{NEEDS[i]} is not installed" if i in NEEDS and harness.version(NEEDS[i]) is None else None
            for i in impls}


def case_runs(case, impls, device="cpu") -> dict:
    """{impl: closure running the case once} (proxy_runs, op_runs or knn_runs)."""
    if isinstance(case, KnnCase):
        return knn_runs(case, impls)
    return (op_runs if isinstance(case, OpCase) else proxy_runs)(case, impls, device)


def set_threads(threads: int) -> None:
    """CPU threads of torch and, when it is installed, faiss."""
    torch.set_num_threads(threads)
    if harness.version("faiss") is not None:
        import faiss
        faiss.omp_set_num_threads(threads)


# ----------------------------------------------------------------------------------------- proxy and op cases
def _pml_module(case, device, dtype):
    from pytorch_metric_learning import losses as pml_losses

    _, pml_name, kwargs, k = PROXY_LOSSES[case.loss]
    extra = {"centers_per_class": k} if k > 1 else {}
    return getattr(pml_losses, pml_name)(num_classes=case.c, embedding_size=case.d, **extra,
                                         **kwargs).to(device, dtype)


def _inputs(case, device):
    """x [N, D] and w [C*K, D] (requiring gradients, in the case's dtype) and labels [N], from seed 0."""
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.n, case.d, generator=g).to(device, dtype).requires_grad_()
    labels = torch.randint(0, case.c, (case.n,), generator=g).to(device)
    w = torch.randn(case.c * case.k, case.d, generator=g).to(device, dtype).requires_grad_()
    return x, labels, w


def _forward_backward(params, call):
    """A closure: clear the gradients of `params`, call, backward from the scalar it returns, return the scalar."""
    def run():
        for p in params:
            p.grad = None
        loss = call()
        loss.backward()
        return loss
    return run


def _gemm_floor(x, w):
    """The GEMMs of a streamed forward + backward, no autograd: x W^T twice, dlogits W and dlogits^T x."""
    xd, wd = x.detach(), w.detach()

    def run():
        logits, again = xd @ wd.T, xd @ wd.T
        return again @ wd, logits.T @ xd
    return run


def proxy_runs(case: ProxyCase, impls, device) -> dict:
    """{impl: closure running one forward + backward}; all implementations share the embeddings and labels (ours
    share the proxies too). "torch.mm" is the GEMM floor (_gemm_floor)."""
    fn_name, _, kwargs, k = PROXY_LOSSES[case.loss]
    x, labels, w = _inputs(case, device)
    extra = {"centers_per_class": k} if k > 1 else {}
    runs = {}
    for impl in impls:
        if impl == "torch.mm":
            runs[impl] = _gemm_floor(x, w)
        elif impl == "pml":
            module = _pml_module(case, device, x.dtype)
            runs[impl] = _forward_backward([x, *module.parameters()], lambda m=module: m(x, labels))
        else:
            runs[impl] = _forward_backward(
                [x, w], lambda b=impl: getattr(F, fn_name)(x, labels, w, **extra, **kwargs, backend=b))
    return runs


def op_runs(case: OpCase, impls, device, inputs=None) -> dict:
    """{impl: closure running one forward + backward of class_lse (its output summed)}: "reference" is the eager
    reference, the other names are `lse.class_lse`'s impl, "torch.mm" the GEMM floor; all share x, w and labels
    (`inputs`: (x, labels, w) of the case's shapes; default: drawn from seed 0)."""
    x, labels, w = inputs or _inputs(case, device)
    spec = {"centers_per_class": case.k, "reduce": case.reduce, **OP_KWARGS}
    runs = {}
    for impl in impls:
        if impl == "torch.mm":
            runs[impl] = _gemm_floor(x, w)
        elif impl == "reference":
            runs[impl] = _forward_backward([x, w], lambda: reference_class_lse(x, w, labels, **spec).sum())
        else:
            runs[impl] = _forward_backward([x, w], lambda i=impl: lse.class_lse(x, w, labels, **spec, impl=i).sum())
    return runs


def measure_proxy(case, impls, device, rounds, memory=True) -> list:
    """One row per implementation of a proxy or op case: times, peak torch allocation, the loss value (the op: its
    output's sum), ratios to ours. An implementation that fails its first call (out of memory, an unsupported dtype)
    gets a row with its error; the others run."""
    runs = case_runs(case, impls, device)
    rows, values = [], {}
    for impl, run in list(runs.items()):
        try:
            out = run()
            values[impl] = out.item() if impl != "torch.mm" else None
        except (RuntimeError, ValueError, TypeError) as error:
            rows.append({**case.fields, "impl": impl, "error": f"{type(error).__name__}: {error}"})
            del runs[impl]
            if device == "cuda":
                torch.cuda.empty_cache()
    times = harness.time_interleaved(runs, rounds, device) if runs else {}
    ours = next((i for i in ("triton", "chunked") if i in times), None)  # what backend="auto" picks here
    flops = 8 * case.n * case.d * case.c * case.k
    for impl, ts in times.items():
        row = {**case.fields, "impl": impl, **_time_fields(ts), "loss_value": values[impl], "flops": flops,
               "tflops": flops / min(ts) / 1e12}
        if ours is not None:
            row["ratio_to_" + ours] = statistics.median(t / b for t, b in zip(ts, times[ours]))
        if memory and impl != "torch.mm":
            row["peak_mb"], row["memory"] = harness.peak_torch_bytes(runs[impl], device) / MB, "torch_alloc"
        rows.append(row)
    return rows


def _time_fields(seconds):
    return {"time_ms_median": 1e3 * statistics.median(seconds), "time_ms_min": 1e3 * min(seconds),
            "times_ms": [1e3 * t for t in seconds]}


# -------------------------------------------------------------------------------------------------- kNN cases
def chunked_torch_topk(queries, reference, k, metric="dot", block_elements=1 << 26):
    """The baseline: torch.mm (torch.cdist for euclidean) over query blocks of at most 2^26 scores (256 MiB fp32)
    + torch.topk."""
    block = max(1, block_elements // reference.shape[0])
    values = torch.empty(queries.shape[0], k)
    indices = torch.empty(queries.shape[0], k, dtype=torch.long)
    for q0 in range(0, queries.shape[0], block):
        q = queries[q0:q0 + block]
        scores = torch.cdist(q, reference) if metric == "euclidean" else torch.mm(q, reference.T)
        values[q0:q0 + block], indices[q0:q0 + block] = scores.topk(k, dim=1, largest=metric != "euclidean")
    return values, indices


def knn_runs(case: KnnCase, impls) -> dict:
    """{impl: closure returning (scores, indices)}; search by case.metric on the case's unit vectors (faiss's index
    is built here, outside the measurements)."""
    g = torch.Generator().manual_seed(0)
    queries, reference = unit_rows(case.queries, case.dim, g), unit_rows(case.references, case.dim, g)
    runs = {}
    for impl in impls:
        if impl in ("mlk.knn", "mlk.knn[dot]"):
            metric = "dot" if impl == "mlk.knn[dot]" else case.metric
            runs[impl] = lambda metric=metric: knn(queries, reference, k=case.k, metric=metric)
        elif impl in ("faiss.IndexFlatIP", "faiss.IndexFlatL2"):
            import faiss

            index = getattr(faiss, impl.split(".")[1])(case.dim)
            index.add(reference.numpy())
            q = queries.numpy()
            runs[impl] = lambda index=index, q=q: tuple(map(torch.from_numpy, index.search(q, case.k)))
        elif impl in ("torch.mm+topk", "torch.cdist+topk"):
            runs[impl] = lambda: chunked_torch_topk(queries, reference, case.k, case.metric)
        else:
            raise ValueError(f"impls: unknown kNN implementation {impl!r}; known: {', '.join(KNN_IMPLS)}")
    return runs


def measure_knn(case: KnnCase, impls, rounds, memory=True) -> list:
    """One row per implementation: times, peak RSS growth of the first call, agreement of the neighbour indices with
    mlk.knn's."""
    runs = knn_runs(case, impls)
    indices, peak = {}, {}
    for impl, run in runs.items():  # the first, cold call: memory (RSS growth) and the neighbours
        peak[impl], (_, indices[impl]) = harness.peak_rss_growth(run) if memory else (None, run())
    times = harness.time_interleaved(runs, rounds)
    rows = []
    for impl, ts in times.items():
        row = {**case.fields, "impl": impl, **_time_fields(ts),
               "gflops": 2 * case.queries * case.references * case.dim / min(ts) / 1e9}
        if "mlk.knn" in times:
            row["ratio_to_mlk.knn"] = statistics.median(t / b for t, b in zip(ts, times["mlk.knn"]))
            row["index_agreement_with_mlk.knn"] = float((indices[impl] == indices["mlk.knn"]).float().mean())
        if memory:
            row["peak_mb"], row["memory"] = peak[impl] / MB, "rss_growth"
        rows.append(row)
    return rows


def unit_rows(n, d, generator):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1).contiguous()


# ---------------------------------------------------------------------------------------------------- outputs
CSV_FIELDS = ("family", "case", "impl", "loss", "op", "reduce", "N", "D", "C", "K", "dtype", "Q", "R", "k",
              "metric", "time_ms_median", "time_ms_min", "peak_mb", "memory", "tflops", "gflops", "loss_value",
              "ratio_to_chunked", "ratio_to_triton", "ratio_to_mlk.knn", "index_agreement_with_mlk.knn",
              "load_average_1min", "error")


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_plots(rows, out) -> list:
    """Per proxy loss, per reduction of the op and for kNN: time and peak memory against C (or R), one line per
    implementation (and dtype), log-log."""
    from . import _plots

    paths = []
    ok = [r for r in rows if "error" not in r]
    groups = {}
    for r in ok:
        key = {"proxy": r.get("loss"), "op": f"{r.get('op')}_{r.get('reduce')}", "knn": "knn"}[r["family"]]
        label = r["impl"] + (f" {r['dtype']}" if r.get("dtype", "float32") != "float32" else "") + (
            f" k={r['k']}" if r["family"] == "knn" and len({x['k'] for x in ok if x['family'] == 'knn'}) > 1 else "")
        groups.setdefault(key, {}).setdefault(label, []).append(r)
    for key, series in groups.items():
        first = next(iter(series.values()))[0]
        x_name = "R" if first["family"] == "knn" else "C"
        where = (f"Q={first['Q']}, D={first['D']}" if x_name == "R"
                 else f"N={first['N']}, D={first['D']}, K={first['K']}")
        x_label = "references R" if x_name == "R" else "classes C"
        for measure, field, unit in (("time", "time_ms_median", "median time (ms)"),
                                     ("memory", "peak_mb", "peak memory (MB)")):
            data = {}
            for label, rs in series.items():
                rs = sorted((r for r in rs if r.get(field) is not None), key=lambda r: r[x_name])
                if rs:
                    data[label] = ([r[x_name] for r in rs], [max(r[field], 1e-3) for r in rs], None)
            if not data:
                continue
            what = "forward + backward" if x_name == "C" else "exact top-k search"
            memory_kind = {"torch_alloc": "peak torch allocation", "rss_growth": "peak RSS growth"}.get(
                first.get("memory"), "")
            title = f"{key}: {what} ({where})" + (f", {memory_kind}" if measure == "memory" else "")
            paths.append(_plots.lines(os.path.join(out, f"{measure}_{key}.png"), data, x_label, unit, title,
                                      logx=10, logy=True))
    return paths


# ------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m metricloss_kernels bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes, {ROUNDS[True]} rounds: about a minute on 2 cores")
    parser.add_argument("--out", default="bench_out", help="output folder (default: %(default)s)")
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=list(COMMAND_FAMILIES),
                        help="case families (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the proxy and op families (kNN runs on the CPU)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="CPU threads of torch and faiss (default: %(default)s)")
    parser.add_argument("--rounds", type=int,
                        help=f"timed rounds after one warm-up (default {ROUNDS[False]}; quick {ROUNDS[True]})")
    parser.add_argument("--losses", nargs="+", choices=tuple(PROXY_LOSSES))
    parser.add_argument("--impls", nargs="+", choices=(*dict.fromkeys(PROXY_IMPLS + op_impls()), *KNN_IMPLS),
                        help="subset of the implementations (default: every one that can run here)")
    parser.add_argument("--cases", nargs="+", help="case names (see --list) instead of the whole grid")
    parser.add_argument("--queries", type=int)
    parser.add_argument("--references", nargs="+", type=int)
    parser.add_argument("--dim", type=int, help="kNN vector width")
    parser.add_argument("--ks", nargs="+", type=int, help="kNN k values (default: 16)")
    parser.add_argument("--metric", choices=tuple(KNN_IMPLS_BY_METRIC), default="dot",
                        help="kNN metric (euclidean: faiss IndexFlatL2, torch.cdist, and our dot search beside it)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--no-plots", action="store_true", help="results only (no matplotlib needed)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--list", action="store_true", help="print the case names of the grid and exit")
    parser.add_argument("--plot-only", nargs="+", metavar="RESULTS_JSON",
                        help="no measurement: the plots of these results files (merged) into --out")
    args = parser.parse_args(argv)
    rounds = args.rounds or ROUNDS[args.quick]
    if rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1")
    if args.plot_only:
        rows = [row for path in args.plot_only for row in json.load(open(path))["rows"]]
        print("wrote", ", ".join(write_plots(rows, args.out)))
        return 0

    grid = cases(args.device, args.quick, args.family, args.losses, queries=args.queries,
                 references=args.references, dim=args.dim, ks=args.ks, metric=args.metric)
    if args.cases:
        by_name = {case.name: case for case in grid}
        unknown = [name for name in args.cases if name not in by_name]
        if unknown:
            parser.error(f"--cases: unknown {unknown}; the grid has: {', '.join(by_name)}")
        grid = [by_name[name] for name in args.cases]
    if args.list:
        print("\n".join(case.name for case in grid))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if not args.no_plots:
        from ._plots import require_matplotlib
        require_matplotlib()  # fail now, not after the measurements

    from tqdm import tqdm

    set_threads(args.threads)
    requested = {*(args.impls or PROXY_IMPLS + op_impls() + KNN_IMPLS), "torch.mm"}  # the floor runs where it can
    plan = {case: [i for i, why in implementations(case, args.device).items() if why is None and i in requested]
            for case in grid}
    impls_by_family = {f"{family}_impls": [*dict.fromkeys(i for case in grid if case.fields["family"] == family
                                                          for i in plan[case])] for family in FAMILIES}
    rows = []
    bar = tqdm(grid, unit="case", disable=args.no_progress)
    for case in bar:
        bar.set_description(case.name)
        load = harness.load_average()
        try:
            if isinstance(case, KnnCase):
                new = measure_knn(case, plan[case], rounds, not args.no_memory)
            else:
                new = measure_proxy(case, plan[case], args.device, rounds, not args.no_memory)
        except (RuntimeError, ValueError, ImportError) as error:  # recorded; the next case still runs
            new = [{**case.fields, "impl": "all", "error": f"{type(error).__name__}: {error}"}]
            if args.device == "cuda":
                torch.cuda.empty_cache()
        for row in new:
            row["load_average_1min"] = [load, harness.load_average()]
        rows += new
        bar.set_postfix_str("  ".join(f"{r['impl']} {r['time_ms_median']:.0f} ms" for r in new
                                      if "time_ms_median" in r))
    bar.close()

    os.makedirs(args.out, exist_ok=True)
    machine = harness.machine_info(args.device)
    result = {"benchmark": "metricloss_kernels bench", "machine": machine,
              "config": {"rounds": rounds, "threads": args.threads, "quick": args.quick, "family": args.family,
                         **impls_by_family, "memory": not args.no_memory},
              "notes": "time: median/min over rounds after a warm-up round, implementations interleaved; ratios: "
                       "median over rounds of time(impl)/time(ours); peak_mb: torch_alloc (proxy, op) or "
                       "rss_growth (knn), see metricloss_kernels/experiments/harness.py; load_average_1min: "
                       "before/after each case.",
              "rows": rows}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_csv(rows, os.path.join(args.out, "results.csv"))
    written = ["results.json", "results.csv"]
    if not args.no_plots:
        written += [os.path.basename(p) for p in write_plots(rows, args.out)]
    for row in rows:
        if "error" in row:
            print(f"{row['case']}: {row['error']}")
        else:
            print(f"{row['case']:44s} {row['impl']:18s} {row['time_ms_median']:10.2f} ms"
                  + (f" {row['peak_mb']:9.1f} MB" if "peak_mb" in row else ""))
    print(f"wrote {', '.join(written)} into {args.out} ({machine['device_name']}, {args.threads} threads, "
          f"load {machine['load_average_1min']})")
    return 1 if any("error" in row for row in rows) else 0
