"""Three claims of the papers this library implements, checked in miniature with the tournament's training protocol
(tournament.train_run: same backbone, initialisation, batches and augmentation per seed for every loss):

- exp_triplet: the exponential triplet loss converges faster than the standard triplet loss (Urtans et al. 2020):
  validation R@1 and MAP@R after each of the first epochs, several seeds, against the triplet loss with the same
  batch-hard triplets and with semi-hard mining.
- mpa: MPA >= ProxyAnchor on classes made of several modes (Saeki et al. 2023): test metrics on the multi-centre
  dataset, embedding sizes x seeds, with single-mode classes of the same size as the control.
- polytope: Margin-RePoNet features sit on their class's polytope vertex (Pernici et al. 2019): the angle between a
  held-out image's feature and its class's vertex against the angle to the nearest other vertex.

    python -m metricloss_kernels claims {exp_triplet,mpa,polytope,all} [--out DIR] [--quick]

Each claim writes <claim>.md (the numbers and the command), <claim>.json and PNGs into --out, whatever comes out.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from ..polytopes import polytope_margin, regular_polytope
from . import _plots, datasets
from .training import machine_summary, mean_std, std, train_run


def _fmt(values, scale=100.0):
    values = [scale * v for v in values]
    return f"{statistics.fmean(values):.2f} ± {std(values):.2f}"


# ----------------------------------------------------------------------------------------- exponential triplet
EXP_LOSSES = {"exp_triplet": ("exp_triplet", {}), "triplet (batch-hard)": ("triplet", {"mining": "hard"}),
              "triplet (semi-hard)": ("triplet", {})}


def exp_triplet(out, quick):
    seeds, epochs, dim = (range(2), 3, 32) if quick else (range(5), 8, 32)
    tasks = [datasets.multi_centre_task(), datasets.digits_task()]
    curves, lines = {}, []
    for task in tasks:
        for label, (loss, overrides) in EXP_LOSSES.items():
            runs = [train_run(task, loss, dim, seed, epochs, overrides=overrides, select=False) for seed in seeds]
            curves[(task.name, label)] = {"val_recall": [r.val_recall for r in runs],
                                          "val_map_r": [r.val_map_r for r in runs]}
    shown = [e for e in (1, 2, 3, 5, 8) if e <= epochs]
    for task in tasks:
        lines += [f"### {task.name}", "", "| loss | " + " | ".join(
            f"epoch {e}: R@1 / MAP@R" for e in shown) + " |", "|" + " --- |" * (1 + len(shown))]
        for label in EXP_LOSSES:
            c = curves[(task.name, label)]
            lines.append(f"| {label} | " + " | ".join(
                f"{_fmt([r[e] for r in c['val_recall']])} / {_fmt([r[e] for r in c['val_map_r']])}"
                for e in shown) + " |")
        exp, hard = curves[(task.name, "exp_triplet")], curves[(task.name, "triplet (batch-hard)")]
        wins = {e: sum(a[e] > b[e] for a, b in zip(exp["val_recall"], hard["val_recall"])) for e in shown}
        lines += ["", "Seeds where exp_triplet's validation R@1 beats batch-hard triplet's: " + ", ".join(
            f"epoch {e}: {w}/{len(seeds)}" for e, w in wins.items()) + ".", ""]
        for metric, name in (("val_recall", "R@1"), ("val_map_r", "MAP@R")):
            series = {label: (list(range(epochs + 1)), *mean_std([[100 * v for v in r]
                                                                    for r in curves[(task.name, label)][metric]]))
                      for label in EXP_LOSSES}
            _plots.lines(os.path.join(out, f"exp_triplet_{task.name}_{name.replace('@', '').lower()}.png"), series,
                         "epoch", f"validation {name} (%)",
                         f"{task.name}: validation {name}, d={dim}, mean ± std over {len(seeds)} seeds", band=True)
    head = (f"Validation metrics (x100, mean ± std over seeds {list(seeds)}) after each of the first {epochs} "
            f"epochs; embedding size {dim}; epoch 0 is the untrained network (the same for every loss).")
    return head, lines, {f"{k[0]}/{k[1]}": v for k, v in curves.items()}


# ------------------------------------------------------------------------------------------------ MPA vs PA
MPA_LOSSES = {"proxy_anchor": ("proxy_anchor", {}), "mpa (K=3)": ("mpa", {}),
              "mpa (K=4)": ("mpa", {"centers_per_class": 4})}


def mpa(out, quick):
    dims, seeds, epochs = ((32,), range(2), 3) if quick else ((16, 32), range(5), 10)
    tasks = {"4 modes per class": datasets.multi_centre_task(),
             "1 mode per class (control)": datasets.multi_centre_task(modes=1, per_mode=80)}
    results, lines = {}, []
    for setting, task in tasks.items():
        for label, (loss, overrides) in MPA_LOSSES.items():
            results[(setting, label)] = [
                {"dim": d, "seed": s, **train_run(task, loss, d, s, epochs, overrides=overrides).test}
                for d in dims for s in seeds]
    for setting in tasks:
        lines += [f"### {setting}", "", "| loss | R@1 | MAP@R | nDCG@10 | experiments won against proxy_anchor "
                  "(R@1) |", "| --- | --- | --- | --- | --- |"]
        base = results[(setting, "proxy_anchor")]
        for label in MPA_LOSSES:
            rs = results[(setting, label)]
            wins = "—" if label == "proxy_anchor" else (
                f"{sum(a['recall@1'] > b['recall@1'] for a, b in zip(rs, base))}/{len(rs)}")
            lines.append(f"| {label} | {_fmt([r['recall@1'] for r in rs])} | {_fmt([r['map@r'] for r in rs])} | "
                         f"{_fmt([r['ndcg@10'] for r in rs])} | {wins} |")
        lines.append("")
        ks = (1, 2, 4, 8)
        series = {label: (list(ks), *mean_std([[100 * r[f"recall@{k}"] for k in ks]
                                                 for r in results[(setting, label)]])) for label in MPA_LOSSES}
        name = "multi" if setting.startswith("4") else "single"
        _plots.lines(os.path.join(out, f"mpa_{name}_mode.png"), series, "k", "test recall@k (%)",
                     f"multi-centre data, {setting}: test recall@k", logx=2)
    head = (f"Multi-centre dataset (datasets.multi_centre_task: 90 training / 10 validation / 100 test classes); "
            f"test metrics (x100) of the epoch selected by validation R@1, mean ± std over {len(dims) * len(seeds)} "
            f"experiments (embedding sizes {list(dims)} x seeds {list(seeds)}), {epochs} epochs.")
    return head, lines, {f"{k[0]}/{k[1]}": v for k, v in results.items()}


# ------------------------------------------------------------------------------------------------- polytopes
POLYTOPES = {"simplex, margin max": ("simplex", "max"), "orthoplex, margin max": ("orthoplex", "max"),
             "cube, margin max": ("cube", "max"), "simplex, margin 0 (plain RePoNet)": ("simplex", 0.0)}


def vertex_angles(features, labels, vertices):
    """Degrees: (angle between each feature and its class's vertex, angle to the nearest other vertex)."""
    cos = torch.nn.functional.normalize(features, dim=1) @ vertices.T
    angles = torch.rad2deg(torch.acos(cos.clamp(-1, 1)))
    own = angles.gather(1, labels[:, None]).squeeze(1)
    return own, angles.scatter(1, labels[:, None], math.inf).min(1).values


def polytope(out, quick):
    seeds, epochs = (range(1), 3) if quick else (range(3), 15)
    base = datasets.digits_task()
    # the claim is about classes the network was trained on: hold out a fifth of every training class's images
    perm = torch.randperm(len(base.y_train), generator=torch.Generator().manual_seed(0))
    held, kept = perm[: len(perm) // 5], perm[len(perm) // 5:]
    task = base._replace(x_train=base.x_train[kept], y_train=base.y_train[kept], x_test=base.x_train[held],
                         y_test=base.y_train[held])
    c = task.num_train_classes
    results, hists = {}, {}
    lines = ["| polytope (d) | neighbour angle φ | angle to own vertex (median) | to nearest other vertex (median) "
             "| own vertex nearest | own angle < φ/2 |", "| --- | --- | --- | --- | --- | --- |"]
    for label, (kind, margin) in POLYTOPES.items():
        vertices = regular_polytope(kind, c)
        d = vertices.shape[1]
        phi = math.degrees(polytope_margin(kind, d))
        rows = []
        for seed in seeds:
            run = train_run(task, "polytope", d, seed, epochs, overrides={"polytope": kind, "margin": margin},
                            keep_embeddings=True, select=False)
            own, other = vertex_angles(run.test_embeddings, task.y_test, vertices)
            rows.append({"seed": seed, "own_median": float(own.median()), "other_median": float(other.median()),
                         "own_nearest": float((own < other).double().mean()),
                         "within_half_phi": float((own < phi / 2).double().mean())})
            if seed == 0:
                hists[label] = (own, other)
        results[label] = {"d": d, "phi_degrees": phi, "seeds": rows}
        lines.append(f"| {label} ({d}) | {phi:.1f}° | {_fmt([r['own_median'] for r in rows], 1)}° | "
                     f"{_fmt([r['other_median'] for r in rows], 1)}° | {_fmt([r['own_nearest'] for r in rows])}% | "
                     f"{_fmt([r['within_half_phi'] for r in rows])}% |")
        _plots.histograms(os.path.join(out, f"polytope_{kind}_{'max' if margin == 'max' else 'nomargin'}.png"),
                          {"to own vertex": hists[label][0], "to nearest other vertex": hists[label][1]},
                          "angle (degrees)", f"{label}, d={d}: held-out images (seed 0)")
    head = (f"Digits: the 36 training classes of the tournament, a fifth of their images held out (fixed generator); "
            f"RegularPolytopeLoss (scale 30) for {epochs} epochs, the last epoch's network; angles of the held-out "
            f"images' features, mean ± std over seeds {list(seeds)} of the per-seed medians and fractions.")
    return head, [""] + lines + [""], results


CLAIMS = {"exp_triplet": exp_triplet, "mpa": mpa, "polytope": polytope}
TITLES = {"exp_triplet": "The exponential triplet loss converges faster than the triplet loss",
          "mpa": "MPA >= ProxyAnchor on multi-centre classes",
          "polytope": "Margin-RePoNet features sit on their class's polytope vertex"}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m metricloss_kernels claims", description=__doc__.split("\n\n")[0])
    parser.add_argument("claim", choices=(*CLAIMS, "all"))
    parser.add_argument("--out", default="claims_out")
    parser.add_argument("--quick", action="store_true", help="fewer seeds and epochs (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the tournament)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    _plots.require_matplotlib()
    os.makedirs(args.out, exist_ok=True)
    command = "python -m metricloss_kernels claims " + " ".join(sys.argv[1:] if argv is None else argv)
    for name in CLAIMS if args.claim == "all" else (args.claim,):
        start = time.perf_counter()
        head, lines, data = CLAIMS[name](args.out, args.quick)
        minutes = (time.perf_counter() - start) / 60
        text = "\n".join([f"# {TITLES[name]}", "", f"Command: `{command}`  ",
                          f"Wall time: {minutes:.1f} min ({machine_summary()}).", "", head, "", *lines])
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump({"command": command, "minutes": minutes, "results": data}, f, indent=1)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
