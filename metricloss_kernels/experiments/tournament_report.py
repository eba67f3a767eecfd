"""The tournament's outputs: summary.md, runs.csv and the PNG plots (tournament.py runs the experiments)."""
import csv
import math
import os
import statistics

import torch

from .training import RECALL_KS, mean_std, std

# the test metrics the tournament ranks by, with their short names
REPORTED = (("recall@1", "R@1"), ("map@r", "MAP@R"), ("ndcg@10", "nDCG@10"))


def summary_table(rows: list) -> str:
    """Markdown table of summarize()'s rows; metrics x100 as mean +- std."""
    head = "| loss | total ranking | average ranking | std | " + " | ".join(s for _, s in REPORTED) + " |"
    lines = [head, "|" + " --- |" * (4 + len(REPORTED))]
    for row in rows:
        metrics = " | ".join(f"{100 * row[f'{key}_mean']:.2f} ± {100 * row[f'{key}_std']:.2f}" for key, _ in REPORTED)
        lines.append(f"| {row['loss']} | {row['total']:g} | {row['average']:.2f} | {row['std']:.2f} | {metrics} |")
    return "\n".join(lines)


def _padded(values, length):
    return list(values) + [math.nan] * (length - len(values))


def _experiments_text(config, data):
    sizes = ", ".join(map(str, config["dims"]))
    seeds = ", ".join(map(str, config["seeds"]))
    c, n = data["classes"], data["samples"]
    return (f"{c['train']} training / {c['validation']} validation / {c['test']} test classes "
            f"({n['train']} / {n['validation']} / {n['test']} samples); experiments: embedding sizes {sizes} x "
            f"seeds {seeds}")


def _rank_table(runs):
    experiments = sorted({(r["dim"], r["seed"]) for r in runs})
    losses = list(dict.fromkeys(r["loss"] for r in runs))
    by_key = {(r["loss"], r["dim"], r["seed"]): r for r in runs}
    lines = ["| loss | " + " | ".join(f"d={d} s={s}" for d, s in experiments) + " |",
             "|" + " --- |" * (1 + len(experiments))]
    for loss in losses:
        cells = [f"{by_key[(loss, d, s)]['rank']:g} ({100 * by_key[(loss, d, s)]['test']['recall@1']:.1f})"
                 for d, s in experiments]
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _untrained_text(untrained):
    cells = [f"{short} {100 * statistics.fmean(u[key] for u in untrained):.2f} ± "
             f"{100 * std([u[key] for u in untrained]):.2f}" for key, short in REPORTED]
    return ("Untrained network (the initial network of every loss at each experiment; not ranked): "
            + ", ".join(cells) + ".")


def write_markdown(results, path, command):
    config = results["config"]
    out = ["# Tournament of loss functions", "",
           f"Command: `{command}`  ",
           f"Wall time: {results['seconds'] / 60:.1f} min ({results['machine']}).  ",
           f"Per loss: same backbone, initialisation, Adam (lr {config['lr']:g}, proxies x10), class-balanced "
           f"batches of {config['batch_size']} ({config['per_class']} per class), {config['epochs']} epochs; "
           f"model selection by validation R@1; ranks by test R@1 (1 = best); metrics x100, mean ± sample std "
           f"over the experiments.", ""]
    for name, data in results["datasets"].items():
        out += [f"## {name}", "", _experiments_text(config, data) + ".", ""]
        if data["overrides"]:
            out += ["Hyper-parameters chosen on the validation classes: " + ", ".join(
                f"{loss} {k}={v:g}" for loss, kw in data["overrides"].items() for k, v in kw.items()) + ".", ""]
        out += [summary_table(data["summary"]), "", _untrained_text(data["untrained"]), "",
                "Rank (test R@1) per experiment:", "", _rank_table(data["runs"]), ""]
        diverged = [f"{r['loss']} (d={r['dim']}, seed {r['seed']}, epoch {r['diverged_at']})" for r in data["runs"]
                    if r["diverged_at"] is not None]
        if diverged:
            out += ["Training stopped at a non-finite loss (the best epoch before it is kept): " + ", ".join(diverged)
                    + ".", ""]
    if len(results["datasets"]) > 1:
        out += ["## All experiments", "", summary_table(results["summary_all"]), ""]
    with open(path, "w") as f:
        f.write("\n".join(out))


def write_csv(results, path):
    keys = [f"recall@{k}" for k in RECALL_KS] + ["map@r", "ndcg@10", "nmi"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "dim", "seed", "loss", "rank", "best_epoch", "val_recall@1", *keys, "diverged_at",
                    "seconds"])
        for name, data in results["datasets"].items():
            for r in data["runs"]:
                w.writerow([name, r["dim"], r["seed"], r["loss"], r["rank"], r["best_epoch"],
                            f"{r['val_recall'][r['best_epoch']]:.6f}", *(f"{r['test'][k]:.6f}" for k in keys),
                            r["diverged_at"], f"{r['seconds']:.1f}"])


def projection(embeddings, labels, max_classes=10, per_class=40, seed=0):
    """2-D t-SNE of unit-normalised embeddings [N, D] on a fixed subsample (at most `max_classes` classes x
    `per_class` samples; exact t-SNE, a few seconds); returns (xy [M, 2], labels [M] renumbered 0..)."""
    from sklearn.manifold import TSNE

    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    classes = classes[torch.randperm(len(classes), generator=g)[:max_classes]].sort().values
    picked = torch.cat([(labels == c).nonzero().squeeze(1)[:per_class] for c in classes])
    x = torch.nn.functional.normalize(embeddings[picked], dim=1).numpy()
    tsne = TSNE(n_components=2, init="pca", perplexity=30, method="exact", max_iter=500, random_state=seed)
    xy = tsne.fit_transform(x)
    return xy, torch.searchsorted(classes, labels[picked]).numpy()


def write_plots(results, out, project=None):
    """recall@k, validation R@1 per epoch and the test-embedding projection per dataset; returns the paths."""
    from . import _plots

    paths = []
    config = results["config"]
    for name, data in results["datasets"].items():
        runs, losses = data["runs"], config["losses"]
        series = {}
        for loss in losses:
            rows = [[r["test"][f"recall@{k}"] * 100 for k in RECALL_KS] for r in runs if r["loss"] == loss]
            series[loss] = (list(RECALL_KS), *mean_std(rows))
        series["untrained network"] = (list(RECALL_KS), *mean_std(
            [[u[f"recall@{k}"] * 100 for k in RECALL_KS] for u in data["untrained"]]))
        paths.append(_plots.lines(os.path.join(out, f"recall_at_k_{name}.png"), series, "k", "test recall@k (%)",
                                  f"{name}: test recall@k, mean ± std over experiments", logx=2))
        epochs = list(range(config["epochs"] + 1))
        series = {loss: (epochs, *mean_std([[100 * v for v in _padded(r["val_recall"], len(epochs))]
                                             for r in runs if r["loss"] == loss])) for loss in losses}
        paths.append(_plots.lines(os.path.join(out, f"validation_r1_{name}.png"), series, "epoch",
                                  "validation recall@1 (%)", f"{name}: validation R@1 per epoch (mean ± std)",
                                  band=True))
        ranked = [row["loss"] for row in data["summary"]]
        pair = project or (ranked[0], ranked[-1])
        labels = results["embeddings"][name]
        panels = {}
        for loss in pair:
            xy, y = projection(results["embeddings"][(name, loss)], labels)
            panels[f"{loss} (total ranking {next(r['total'] for r in data['summary'] if r['loss'] == loss):g})"] = (
                xy, y)
        paths.append(_plots.scatter_panels(
            os.path.join(out, f"embeddings_{name}.png"), panels,
            f"{name}: t-SNE of test embeddings (d={config['dims'][-1]}, seed {config['seeds'][0]}, 10 classes)"))
    return paths
