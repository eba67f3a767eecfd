"""mlk.evaluate on 10k x 64 embeddings of 2,000 classes: its time with NMI on the library's k-means
(metricloss_kernels/_kmeans.py) against the same metrics with scikit-learn's KMeans(n_init=1) for NMI (what
evaluate ran before), and the agreement of the two NMIs.

Data (--data sphere): 2,000 class centres drawn uniformly on the unit sphere, 5 samples each = the centre plus
Gaussian noise of norm about --noise, normalised (as trained embeddings; leave-one-out retrieval, cosine). NMI
clusters them as given. --data gaussian: i.i.d. standard normal embeddings and uniformly random labels (no
structure: the case where k-means would iterate longest).

Timed (harness.time_interleaved: one warm-up round, then rounds calling each once in a rotating order, one process,
--threads for torch and, through threadpoolctl, for scikit-learn's OpenMP/BLAS):
  evaluate          mlk.evaluate(x, y): every metric, NMI on the library's k-means
  evaluate_no_nmi   mlk.evaluate(x, y, exclude=("nmi",))
  nmi               mlk.metrics.nmi(x, y)
  nmi_sklearn       KMeans(2000, n_init=1, random_state=0) on float64 + normalized_mutual_info_score
so evaluate before this change took about evaluate_no_nmi + nmi_sklearn.
Agreement: both NMIs for k-means seeds 0..--seeds-1, at each --agreement-noise.

    python benchmarks/bench_evaluate.py                     # -> results/evaluate_cpu.json
    python benchmarks/bench_evaluate.py --data gaussian --agreement-noise 0 \
        --output benchmarks/results/evaluate_cpu_gaussian.json
    python benchmarks/bench_evaluate.py --n 2000 --classes 400 --rounds 1 --seeds 1 --output /tmp/e.json  # a check
"""
import argparse
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import metricloss_kernels as mlk  # noqa: E402
from metricloss_kernels.experiments import harness  # noqa: E402


def make_data(n, d, classes, noise, seed=0, kind="sphere"):
    """Embeddings [n, d] and labels [n]: unit-norm, `classes` classes of n / classes samples each (sphere), or
    standard normal with random labels (gaussian)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)
    centres = torch.nn.functional.normalize(torch.randn(classes, d, generator=g), dim=1)
    y = torch.arange(n) % classes
    x = centres[y] + noise / d ** 0.5 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1), y


def nmi_sklearn(x, y, seed=0):
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    clusters = KMeans(n_clusters=len(torch.unique(y)), n_init=1, random_state=seed).fit_predict(x.double().numpy())
    return float(normalized_mutual_info_score(y.numpy(), clusters))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--classes", type=int, default=2_000)
    parser.add_argument("--data", choices=("sphere", "gaussian"), default="sphere")
    parser.add_argument("--noise", type=float, default=1.25, help="noise of the timed data set")
    parser.add_argument("--agreement-noise", type=float, nargs="+", default=[1.0, 1.25, 1.5])
    parser.add_argument("--seeds", type=int, default=3, help="k-means seeds of the agreement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "evaluate_cpu.json"))
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    load_before = harness.load_average()
    with threadpool_limits(args.threads):
        x, y = make_data(args.n, args.d, args.classes, args.noise, kind=args.data)
        runs = {"evaluate": lambda: mlk.evaluate(x, y),
                "evaluate_no_nmi": lambda: mlk.evaluate(x, y, exclude=("nmi",)),
                "nmi": lambda: mlk.metrics.nmi(x, y),
                "nmi_sklearn": lambda: nmi_sklearn(x, y)}
        seconds = harness.time_interleaved(runs, args.rounds)
        median = {name: statistics.median(s) for name, s in seconds.items()}
        print("median seconds", json.dumps(median), flush=True)
        agreement = {}
        for noise in args.agreement_noise:
            xa, ya = make_data(args.n, args.d, args.classes, noise, kind=args.data)
            ours = [mlk.metrics.nmi(xa, ya, seed=s) for s in range(args.seeds)]
            theirs = [nmi_sklearn(xa, ya, seed=s) for s in range(args.seeds)]
            agreement[str(noise)] = {
                "nmi": ours, "nmi_sklearn": theirs, "recall@1": mlk.evaluate(xa, ya, include=("recall@1",))["recall@1"],
                "max_abs_difference": max(abs(a - b) for a, b in zip(ours, theirs)),
                "mean_difference": statistics.mean(ours) - statistics.mean(theirs)}
            print("noise", noise, json.dumps(agreement[str(noise)]), flush=True)
    meta = {**harness.machine_info("cpu"), "load_average_1min_before": load_before, "rounds": args.rounds,
            "case": {"data": args.data, "n": args.n, "d": args.d, "classes": args.classes, "noise": args.noise},
            "note": "the machine is shared: see the load averages before and after (1-minute, 2 cores)"}
    meta["load_average_1min_after"] = meta.pop("load_average_1min")
    result = {"meta": meta, "seconds": seconds, "median_s": median,
              "median_before_s": median["evaluate_no_nmi"] + median["nmi_sklearn"], "agreement": agreement}
    harness.write_json(args.output, result)


if __name__ == "__main__":
    main()
