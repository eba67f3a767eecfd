"""The fair-comparison protocol of Psomas (*Metric Learning: A Deep Dive*, 2020) as a command: a tournament of
loss functions.

    python -m metricloss_kernels tournament [--quick] [--out DIR] [--search] [--datasets ...] [--losses ...]

Protocol (docs/tournament.md):
- Class-disjoint splits: the training classes split 90/10 into training and validation classes (the validation
  classes fixed, the same for every run), and test classes never seen in any form (datasets.py).
- The same backbone, initialisation (per seed), optimiser, learning rate, batch sampler (mlk.MPerClassSampler),
  augmentation and epoch budget for every loss; the losses keep the settings of `zoo` (or those picked by the
  optional hyper-parameter search, which looks at the validation classes only).
- Model selection: validation recall@1 after every epoch (ties broken by validation MAP@R); the test metrics are
  those of the selected epoch's network.
- Experiments: embedding sizes x seeds, per dataset. Per experiment the losses are ranked by test recall@1 (1 =
  best, ties share their mean rank). Per loss: total ranking (sum of its ranks), average ranking and its standard
  deviation, and mean +- std of R@1, MAP@R and nDCG@10 over the experiments.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import NamedTuple

import torch

from . import datasets, zoo
from .tournament_report import REPORTED, write_csv, write_markdown, write_plots
from .training import initial_network, machine_summary, std, test_metrics, train_run


class Config(NamedTuple):
    datasets: tuple
    losses: tuple
    dims: tuple
    seeds: tuple
    epochs: int
    batch_size: int = 128
    per_class: int = 4  # samples per class in a batch
    lr: float = 1e-3
    search: bool = False


QUICK = Config(datasets=("digits", "multi_centre"), losses=("proxy_anchor", "mpa", "triplet", "contrastive"),
               dims=(32,), seeds=(0, 1), epochs=4)
FULL = Config(datasets=("digits", "multi_centre"),
              losses=("contrastive", "triplet", "lifted", "npairs", "margin", "multi_similarity", "exp_triplet",
                      "proxy_nca", "proxy_anchor", "soft_triple", "mpa", "arcface", "cosface", "proxy_repel"),
              dims=(16, 64), seeds=(0, 1, 2), epochs=10)

# The optional search: one hyper-parameter per loss, three values around the zoo's setting.
SEARCH_SPACE = {
    "proxy_anchor": {"alpha": (16.0, 32.0, 64.0)}, "proxy_nca": {"scale": (4.0, 8.0, 16.0)},
    "soft_triple": {"la": (10.0, 20.0, 40.0)}, "mpa": {"alpha": (16.0, 32.0, 64.0)},
    "mpa_dw": {"alpha": (16.0, 32.0, 64.0)}, "mpa_ap": {"alpha": (16.0, 32.0, 64.0)},
    "arcface": {"scale": (8.0, 16.0, 32.0)}, "cosface": {"scale": (8.0, 16.0, 32.0)},
    "l2_softmax": {"scale": (8.0, 16.0, 32.0)}, "proxy_repel": {"alpha": (16.0, 32.0, 64.0)},
    "contrastive": {"neg_margin": (0.3, 0.5, 0.7)}, "triplet": {"margin": (0.05, 0.1, 0.2)},
    "lifted": {"margin": (0.25, 0.5, 1.0)}, "npairs": {"l2_reg": (0.005, 0.02, 0.08)},
    "margin": {"margin": (0.1, 0.2, 0.3)}, "multi_similarity": {"base": (0.3, 0.5, 0.7)},
    "exp_triplet": {"overlap": (0.6, 1.2, 2.4)},
}
SEARCH_SEED = 1000  # a seed no experiment uses


# ------------------------------------------------------------------------------------------ ranking, summary
def rank(scores: dict) -> dict:
    """{name: score} -> {name: rank}, 1 = highest score; tied scores share the mean of their ranks; NaN ranks
    last."""
    key = {name: (-math.inf if math.isnan(s) else s) for name, s in scores.items()}
    ordered = sorted(key, key=lambda n: -key[n])
    ranks, i = {}, 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and key[ordered[j + 1]] == key[ordered[i]]:
            j += 1
        for name in ordered[i:j + 1]:
            ranks[name] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def summarize(rankings: list, metrics: list) -> list:
    """The thesis's summary. rankings: one {loss: rank} per experiment; metrics: one {loss: {metric: value}} per
    experiment. Returns one row per loss, best (lowest total ranking) first: {"loss", "total", "average", "std",
    "experiments", and "<metric>_mean" / "<metric>_std" for every metric}. std: sample standard deviation."""
    rows = []
    for loss in rankings[0]:
        ranks = [r[loss] for r in rankings]
        row = {"loss": loss, "total": sum(ranks), "average": statistics.fmean(ranks), "std": std(ranks),
               "experiments": len(ranks)}
        for name in metrics[0][loss]:
            values = [m[loss][name] for m in metrics]
            row[f"{name}_mean"], row[f"{name}_std"] = statistics.fmean(values), std(values)
        rows.append(row)
    return sorted(rows, key=lambda row: (row["total"], row["loss"]))


# --------------------------------------------------------------------------------------------------- search
def search(task, losses, dim, epochs, config, progress=None) -> dict:
    """{loss: {argument: value}}: per loss, the value of SEARCH_SPACE's argument with the best validation R@1
    (then MAP@R), trained once with SEARCH_SEED; losses without a search space keep their settings."""
    chosen = {}
    for loss in losses:
        best = None
        for arg, values in SEARCH_SPACE.get(loss, {}).items():
            for value in values:
                run = train_run(task, loss, dim, SEARCH_SEED, epochs, config.batch_size, config.per_class,
                                config.lr, {arg: value})
                score = (run.val_recall[run.best_epoch], run.val_map_r[run.best_epoch])
                if best is None or score > best[0]:
                    best = (score, {arg: value})
                if progress is not None:
                    progress(f"search {task.name} {loss} {arg}={value}: val R@1 {100 * score[0]:.2f}")
        chosen[loss] = best[1] if best else {}
    return chosen


# ----------------------------------------------------------------------------------------------------- runs
def check_config(config: Config) -> None:
    """ValueError naming the field of `config` that cannot run."""
    for name in config.datasets:
        if name not in datasets.TASKS:
            raise ValueError(f"datasets: unknown {name!r}; known: {', '.join(datasets.TASKS)}")
    allowed = [n for n in zoo.LOSSES if n not in zoo.FIXED_WIDTH]
    for name in config.losses:
        if name not in allowed:
            raise ValueError(f"losses: {name!r} cannot take part (the losses of variable embedding width are "
                             f"{', '.join(allowed)})")
    if len(set(config.losses)) < 2:
        raise ValueError(f"losses: a tournament needs at least 2 different losses, got {list(config.losses)}")
    for field in ("dims", "seeds"):
        if not getattr(config, field):
            raise ValueError(f"{field}: at least one value is needed")
    if config.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {config.epochs}")
    if config.batch_size % config.per_class or config.batch_size < 2 * config.per_class:
        raise ValueError(f"batch_size must be a multiple of per_class ({config.per_class}) holding at least two "
                         f"classes, got {config.batch_size}")


def experiment_tables(runs: list):
    """Ranks the losses of every experiment (the runs sharing dim and seed) by test R@1 and stores it as
    run["rank"]; returns (rankings, metrics): per experiment {loss: rank} and {loss: {metric: value}}."""
    rankings, metrics = [], []
    for experiment in sorted({(r["dim"], r["seed"]) for r in runs}):
        these = [r for r in runs if (r["dim"], r["seed"]) == experiment]
        ranks = rank({r["loss"]: r["test"]["recall@1"] for r in these})
        for r in these:
            r["rank"] = ranks[r["loss"]]
        rankings.append(ranks)
        metrics.append({r["loss"]: {key: r["test"][key] for key, _ in REPORTED} for r in these})
    return rankings, metrics


def run_tournament(config: Config, progress_bar=True) -> dict:
    """Runs every experiment of `config`. Returns the JSON-serialisable results, plus, under "embeddings", the test
    embeddings of the first seed at the largest embedding size per (dataset, loss) and the test labels per dataset
    (for the projection plot)."""
    from tqdm import tqdm

    check_config(config)
    tasks = {name: datasets.TASKS[name]() for name in config.datasets}
    search_epochs = max(1, config.epochs // 2)
    searched = sum(len(v) for loss in config.losses for v in SEARCH_SPACE.get(loss, {}).values())
    total = len(tasks) * (len(config.dims) * len(config.seeds) * len(config.losses) * config.epochs
                          + (searched * search_epochs if config.search else 0))
    bar = tqdm(total=total, unit="epoch", desc="tournament", disable=not progress_bar)
    results = {"config": config._asdict(), "datasets": {}, "embeddings": {}}
    start = time.perf_counter()
    all_rankings, all_metrics = [], []
    for name, task in tasks.items():
        overrides = {}
        if config.search:
            bar.set_description(f"{name} search")
            overrides = search(task, config.losses, config.dims[len(config.dims) // 2], search_epochs, config,
                               progress=lambda msg: (bar.set_postfix_str(msg), bar.update(search_epochs)))
        runs = []
        for dim in config.dims:
            for seed in config.seeds:
                for loss in config.losses:
                    bar.set_description(f"{name} d={dim} seed={seed} {loss}")
                    keep = seed == config.seeds[0] and dim == config.dims[-1]
                    run = train_run(task, loss, dim, seed, config.epochs, config.batch_size, config.per_class,
                                    config.lr, overrides.get(loss), keep,
                                    on_epoch=lambda e, r1: (bar.update(), bar.set_postfix(val_R1=f"{100 * r1:.1f}")))
                    bar.update(config.epochs + 1 - len(run.val_recall))  # epochs skipped after a divergence
                    if keep:
                        results["embeddings"][(name, loss)] = run.test_embeddings
                    runs.append({"dim": dim, "seed": seed, "loss": loss,
                                 **{k: v for k, v in run._asdict().items() if k != "test_embeddings"}})
        results["embeddings"][name] = task.y_test
        untrained = [{"dim": dim, "seed": seed, **test_metrics(initial_network(task, dim, seed), task)}
                     for dim in config.dims for seed in config.seeds]
        rankings, metrics = experiment_tables(runs)
        all_rankings += rankings
        all_metrics += metrics
        results["datasets"][name] = {
            "classes": {"train": task.num_train_classes, "validation": len(torch.unique(task.y_val)),
                        "test": len(torch.unique(task.y_test))},
            "samples": {"train": len(task.y_train), "validation": len(task.y_val), "test": len(task.y_test)},
            "overrides": overrides, "summary": summarize(rankings, metrics), "untrained": untrained, "runs": runs}
    bar.close()
    results["summary_all"] = summarize(all_rankings, all_metrics)
    results["seconds"] = time.perf_counter() - start
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m metricloss_kernels tournament",
                                     description="Tournament of loss functions with a fixed validation set "
                                                 "(Psomas 2020); writes summary.md, runs.csv, results.json and "
                                                 "PNG plots into --out.")
    parser.add_argument("--quick", action="store_true",
                        help=f"the small configuration ({len(QUICK.losses)} losses, "
                             f"{len(QUICK.dims) * len(QUICK.seeds)} experiments per dataset, {QUICK.epochs} "
                             f"epochs; a few minutes on 2 cores)")
    parser.add_argument("--out", default="tournament_out", help="output folder (default: %(default)s)")
    parser.add_argument("--datasets", nargs="+", choices=tuple(datasets.TASKS))
    parser.add_argument("--losses", nargs="+", choices=[n for n in zoo.LOSSES if n not in zoo.FIXED_WIDTH])
    parser.add_argument("--dims", nargs="+", type=int, help="embedding sizes")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--search", action="store_true",
                        help="pick one hyper-parameter per loss among 3 values on the validation classes first")
    parser.add_argument("--project", nargs=2, metavar="LOSS",
                        help="the two losses of the embedding projection (default: first and last of the ranking)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these small networks train fastest on one thread per "
                             "process, and a shared machine's contention hurts multi-threaded runs most)")
    parser.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    config = QUICK if args.quick else FULL
    config = config._replace(**{field: tuple(v) if isinstance(v, list) else v for field in
                                ("datasets", "losses", "dims", "seeds", "epochs")
                                if (v := getattr(args, field)) is not None}, search=args.search)
    if args.project and not set(args.project) <= set(config.losses):
        parser.error(f"--project: both losses must take part, got {args.project}")
    try:
        check_config(config)
    except ValueError as error:
        parser.error(str(error))
    if not args.no_plots:
        from ._plots import require_matplotlib
        require_matplotlib()  # fail now, not after the training

    torch.set_num_threads(args.threads)
    results = run_tournament(config, progress_bar=not args.no_progress)
    results["machine"] = machine_summary()

    os.makedirs(args.out, exist_ok=True)
    command = "python -m metricloss_kernels tournament " + " ".join(argv if argv is not None else sys.argv[2:])
    results["command"] = command.strip()
    write_markdown(results, os.path.join(args.out, "summary.md"), results["command"])
    write_csv(results, os.path.join(args.out, "runs.csv"))
    written = ["summary.md", "runs.csv", "results.json"]
    if not args.no_plots:
        written += [os.path.basename(p) for p in write_plots(results, args.out, args.project)]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({k: v for k, v in results.items() if k != "embeddings"}, f, indent=1)
    with open(os.path.join(args.out, "summary.md")) as f:
        print(f.read())
    print(f"wrote {', '.join(written)} into {args.out} in {results['seconds'] / 60:.1f} min")
    return 0
