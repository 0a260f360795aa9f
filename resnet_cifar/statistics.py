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


CONFIDENCE = 0.95
# What a paper's figure is: one run, the best, the median or the mean of n runs, or a figure whose statistic the
# paper does not name. `ours` is the same statistic of this project's runs (for one run and an unnamed statistic,
# the mean: what one run is expected to give).
STATISTICS = {"single": "one run", "best": "best of {n}", "median": "median of {n}", "mean": "mean of {n}",
              "unnamed": "statistic not named"}


def published_figure(entry):
    """An experiment row's `published`: a number (one run), or a table {value, statistic, n, mean, std} (mean and
    std: the paper's mean ± std over its n runs, where it prints them). None stays None; ValueError if malformed."""
    if entry is None:
        return None
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return {"value": float(entry), "statistic": "single", "n": 1, "mean": None, "std": None}
    if not isinstance(entry, dict) or not isinstance(entry.get("value"), (int, float)):
        raise ValueError("published must be a number or a table with a number `value`")
    statistic = entry.get("statistic", "single")
    if statistic not in STATISTICS:
        raise ValueError(f"published statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    n = entry.get("n", 1)
    if not isinstance(n, int) or n < 1 or (statistic in ("best", "median", "mean") and n < 2):
        raise ValueError(f"published n must be the paper's number of runs (>= 2 for {statistic}), got {n!r}")
    unknown = set(entry) - {"value", "statistic", "n", "mean", "std"}
    if unknown:
        raise ValueError(f"published has unknown keys {', '.join(sorted(unknown))}")
    mean = entry.get("mean", entry["value"] if statistic == "mean" else None)
    return {"value": float(entry["value"]), "statistic": statistic, "n": n, "mean": mean, "std": entry.get("std")}


def describe_published(published):
    return STATISTICS[published["statistic"]].format(n=published["n"])


def same_statistic(values, statistic):
    """Our runs' figure comparable with a paper's `statistic` (fractions, like `values`), and its name."""
    n = len(values)
    if statistic == "best":
        return max(values), f"best of {n}"
    if statistic == "median":
        return statistics.median(values), f"median of {n}"
    return statistics.fmean(values), f"mean of {n}"


def mean_interval(values):
    """The CONFIDENCE interval of the mean (Student's t, n - 1 degrees of freedom); None for fewer than 2 values."""
    import scipy.stats
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    if len(set(values)) == 1:
        return mean, mean
    low, high = scipy.stats.t.interval(CONFIDENCE, len(values) - 1, loc=mean, scale=scipy.stats.sem(values))
    return float(low), float(high)


def published_interval(published):
    """The paper's own interval of its mean, from the mean ± std over n runs it prints; None without them."""
    import scipy.stats
    if published["std"] is None or published["mean"] is None or published["n"] < 2:
        return None
    low, high = scipy.stats.t.interval(CONFIDENCE, published["n"] - 1, loc=published["mean"],
                                       scale=published["std"] / published["n"] ** 0.5)
    return float(low), float(high)


def welch(values, reference):
    """(difference of means values - reference, its CONFIDENCE interval, Welch's two-sided p-value), from
    scipy.stats.ttest_ind(equal_var=False); None when either side has fewer than 2 values."""
    import scipy.stats
    if len(values) < 2 or len(reference) < 2:
        return None
    result = scipy.stats.ttest_ind(values, reference, equal_var=False)
    interval = result.confidence_interval(CONFIDENCE)
    return (statistics.fmean(values) - statistics.fmean(reference), (float(interval.low), float(interval.high)),
            float(result.pvalue))


def run_minutes(history):
    return sum(row.get("seconds", 0.0) for row in history) / 60


def markdown_table(rows, reduced=None):
    """rows: dicts with label, accuracies (final test accuracies, 0-1), minutes (each run's training time) and
    published (published_figure, %, or None). With `reduced` (the differences from the experiment's own settings,
    e.g. ["--stack-n 1 instead of 9"]) no difference from the published figure is printed."""
    lines = ["| row | n | mean ± std (%) | 95 % CI of the mean (%) | median (%) | min-max (%) | run time (min) | "
             "published (%) | ours, same statistic (%) | ours - published |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        published = row.get("published")
        shown = "-" if published is None else f"{published['value']:g} ({describe_published(published)}"
        if published is not None and published_interval(published):
            low, high = published_interval(published)
            shown += f"; {published['mean']:g} ± {published['std']:g}, 95 % CI {low:.2f} to {high:.2f}"
        shown += ")" if published is not None else ""
        values = row["accuracies"]
        if not values:
            lines.append(f"| {row['label']} | 0 | - | - | - | - | - | {shown} | - | - |")
            continue
        s = summary(values)
        spread = f"{percent(s['mean'])} ± {percent(s['std'])}" if s["std"] is not None else percent(s["mean"])
        interval = mean_interval(values)
        interval = f"{percent(interval[0])} to {percent(interval[1])}" if interval else "undefined (n = 1)"
        minutes = row.get("minutes") or []
        time_cell = (f"{statistics.fmean(minutes):.1f} ± {statistics.stdev(minutes):.1f}" if len(minutes) > 1
                     else f"{minutes[0]:.1f}" if minutes else "-")
        ours = difference = "-"
        if published is not None:
            value, name = same_statistic(values, published["statistic"])
            ours = f"{percent(value)} ({name})"
            if not reduced:
                difference = f"{100 * value - published['value']:+.2f}"
        lines.append(f"| {row['label']} | {s['n']} | {spread} | {interval} | {percent(s['median'])} | "
                     f"{percent(s['min'])}-{percent(s['max'])} | {time_cell} | {shown} | {ours} | {difference} |")
    return "\n".join(lines)


def against_table(rows, reference):
    """Each other row against the row labelled `reference`: the difference of mean accuracies (points), its 95 %
    interval and Welch's t-test p-value (scipy.stats)."""
    base = next(row for row in rows if row["label"] == reference)
    lines = [f"| row | mean - mean of {reference} (points) | 95 % CI (points) | p (Welch's t-test) |",
             "|---|---:|---:|---:|"]
    for row in rows:
        if row is base:
            continue
        test = welch(row["accuracies"], base["accuracies"])
        if test is None:
            lines.append(f"| {row['label']} | - | undefined (fewer than 2 runs) | - |")
            continue
        difference, (low, high), p = test
        lines.append(f"| {row['label']} | {100 * difference:+.2f} | {100 * low:+.2f} to {100 * high:+.2f} | "
                     f"{p:.3g} |")
    return "\n".join(lines)


def data_sources(runs):
    """One line on the data of `runs` (dicts with a row `label` and the run's saved configuration `config`):
    their fingerprint and whether it is the official data, or that they mix sources."""
    sources = {}
    for run in runs:
        key = (run["config"].get("data_fingerprint", "unknown"), run["config"].get("official_data"))
        sources.setdefault(key, []).append(run["label"])
    if not sources:
        return "Data: no finished run."

    def name(fingerprint, official):
        kind = {True: "the official archive", False: "not the official archive (a re-encoded or rebuilt copy?)",
                None: "not recorded"}[official]
        return f"fingerprint {fingerprint}, {kind}"
    if len(sources) == 1:
        (key,) = sources
        return f"Data: {name(*key)}."
    parts = [f"{name(*key)} ({', '.join(sorted(set(labels)))})" for key, labels in sources.items()]
    return "Data: the runs mix data sources, compare with care: " + "; ".join(parts) + "."


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
