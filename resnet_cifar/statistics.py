"""Runs that differ only in their seed, summarized together: the statistics of a paper's table (n, mean, sample
standard deviation, median, min-max of the final test accuracy), its Markdown, and a figure of mean curves with
min-max bands. Used by reproduce.py and compare.py. Import-safe: matplotlib is imported to draw only.
"""
import csv
import math
import statistics

from .outputs import EVALUATION_FIELD

# Keys of a run's configuration that differ between the seeds of one setting (or say nothing about it).
PER_RUN_KEYS = frozenset({"seed", "init_seed", "data_seed", "run_name", "command", "checkpoint", "checkpoint_dir", "log_dir", "keras",
                          "verbose", "devices", "processes", "data_dir", "wait_timeout", "coordinator",
                          "num_processes", "process_id", "cpu_devices"})


def read_history(path):
    """A history.csv as a list of dicts of floats ('' and 'nan' as NaN); the text column `evaluation` (how the
    test set was evaluated) as it is."""
    with open(path) as f:
        return [{k: v if k == EVALUATION_FIELD else float(v) if v not in ("", None) else math.nan
                 for k, v in row.items()} for row in csv.DictReader(f)]


def final_accuracy(history):
    """The last epoch's test accuracy (never the best epoch: selecting on the test set would flatter)."""
    return history[-1]["test_accuracy"]


def summary(values):
    """n, mean, sample standard deviation (n - 1; None for one value), median, min, max."""
    n = len(values)
    return {"n": n, "mean": statistics.fmean(values), "std": statistics.stdev(values) if n > 1 else None,
            "median": statistics.median(values), "min": min(values), "max": max(values)}


def setting_key(config):
    """What identifies a setting across its seeds: the configuration without the per-run keys."""
    return tuple(sorted((k, str(v)) for k, v in config.items() if k not in PER_RUN_KEYS))


def group_by_seed(runs):
    """[(first run's name, [runs])] for runs (dicts with "name", "config", "history") grouped by setting, in the
    order each setting first appears; runs without a configuration stay alone."""
    groups = {}
    for run in runs:
        key = setting_key(run["config"]) if run["config"] else ("alone", run["name"])
        groups.setdefault(key, []).append(run)
    return [(members[0]["name"], members) for members in groups.values()]


def percent(value):
    return "-" if value is None else f"{100 * value:.2f}"


def markdown_table(rows, published_label="published"):
    """rows: dicts with label, accuracies (final test accuracies, 0-1) and optionally published (%)."""
    lines = [f"| row | n | mean ± std (%) | median (%) | min-max (%) | {published_label} (%) | mean - published |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if not row["accuracies"]:
            lines.append(f"| {row['label']} | 0 | - | - | - | {row.get('published', '-')} | - |")
            continue
        s = summary(row["accuracies"])
        published = row.get("published")
        spread = f"{percent(s['mean'])} ± {percent(s['std'])}" if s["std"] is not None else percent(s["mean"])
        difference = f"{100 * s['mean'] - published:+.2f}" if published is not None else "-"
        lines.append(f"| {row['label']} | {s['n']} | {spread} | {percent(s['median'])} | "
                     f"{percent(s['min'])}-{percent(s['max'])} | {published if published is not None else '-'} | "
                     f"{difference} |")
    return "\n".join(lines)


def mean_curves_figure(rows, out, title):
    """Per row, the mean test accuracy per epoch over its runs, with the min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 6))
    for row in rows:
        histories = [h for h in row["histories"] if h]
        if not histories:
            continue
        epochs = min(len(h) for h in histories)
        key = "val_accuracy" if "val_accuracy" in histories[0][0] else "test_accuracy"  # --val-split: per epoch
        curves = [[h[e][key] for e in range(epochs)] for h in histories]
        x = list(range(1, epochs + 1))
        mean = [statistics.fmean(c[e] for c in curves) for e in range(epochs)]
        line, = ax.plot(x, mean, label=f"{row['label']} (n={len(curves)})")
        ax.fill_between(x, [min(c[e] for c in curves) for e in range(epochs)],
                        [max(c[e] for c in curves) for e in range(epochs)], color=line.get_color(), alpha=0.2)
    ax.set(title=title, xlabel="epoch", ylabel="test (or validation) accuracy: mean, min-max band")
    ax.grid(alpha=0.3)
    if ax.lines:  # no run finished: an empty figure, and no legend warning
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
