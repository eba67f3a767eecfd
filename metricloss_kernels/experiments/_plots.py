"""PNG plots of the tournament, the claims and the benchmarks (matplotlib: the optional `plot` extra).

Every figure is small (6.4 x 4 inches at 100 dpi) so that the committed PNGs stay well under 150 KB.
"""
import os

INSTALL_HINT = ("matplotlib is needed for the PNG plots: pip install 'metricloss_kernels[apps]' "
                "(or pip install matplotlib); or pass --no-plots")


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend; SystemExit with how to install it when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    require_matplotlib().close(fig)
    return path


def lines(path, series, xlabel, ylabel, title, logx=None, logy=False, band=False):
    """One line per series with error bars (or a shaded band when `band`); `logx`: None or the log axis's base.

    series: {label: (x [n], mean [n], std [n] or None)}; NaN means leave the point out."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (label, (x, mean, std)) in enumerate(series.items()):
        # ten colours, then the same ones dashed: up to 20 series stay distinguishable
        style = {"color": plt.cm.tab10.colors[i % 10], "linestyle": "-" if i < 10 else "--", "label": label,
                 "marker": "o", "markersize": 3}
        if band or std is None:
            ax.plot(x, mean, **style)
            if std is not None:
                ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=style["color"], alpha=0.12)
        else:
            ax.errorbar(x, mean, yerr=std, capsize=3, **style)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 300, not 3x10^2
    if logx:
        ax.set_xscale("log", base=logx)
        ax.set_xticks(sorted({v for x, _, _ in series.values() for v in x}))  # ticks at the measured sizes
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
    elif all(float(v).is_integer() for _, (x, _, _) in series.items() for v in x):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if logy:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
    return _save(fig, path)


def scatter_panels(path, panels, title):
    """Side-by-side 2-D scatter plots coloured by label. panels: {subtitle: (xy [N, 2] tensor, labels [N])}."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4, 3.4))
    for ax, (subtitle, (xy, labels)) in zip(axes, panels.items()):
        ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=3, linewidths=0)
        ax.set_title(subtitle, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def histograms(path, series, xlabel, title, bins=40):
    """Overlaid histograms on shared bins. series: {label: values (1-D tensor or list)}."""
    import numpy as np

    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    values = {label: np.asarray([float(v) for v in vs]) for label, vs in series.items()}
    edges = np.histogram_bin_edges(np.concatenate(list(values.values())), bins=bins)
    for label, vs in values.items():
        ax.hist(vs, bins=edges, alpha=0.55, label=label)
    ax.set(xlabel=xlabel, ylabel="samples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)
