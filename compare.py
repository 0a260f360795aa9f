"""Compare training runs: one figure of their curves and a Markdown table, as the articles show them.

    python compare.py resnet32_a_cifar10 resnet32_e_cifar10 --out units.png
    python compare.py logs/resnet56_a_cifar10 logs/plain56_a_cifar10 --out plain.png --zoom 20

RUN is a run's log folder or a run name under --log-dir (default logs/); each holds history.csv and
config.json, written by every training script, or a history.csv alone (the article recipe's --history, whose
columns are the same), so that one figure overlays both. The figure has train accuracy, train loss, test accuracy
and test loss per epoch for all runs (legend by run name) and a zoomed panel of the last epochs' test
accuracy. The table (stdout) gives each run's model, parameters, checkpoint size on disk, final and best
test accuracy, epochs and seconds per epoch. Final accuracy is the last epoch's: select on it, not on the
best, which peeks at the test set. Runs that differ only in their seed are also summarized together (n,
mean ± sample std, median, min-max of the final test accuracy), as reproduce.py's tables do.
"""
import argparse
import json
import os

from resnet_cifar import cli, statistics
from resnet_cifar.errors import UsageError, one_line_usage_errors
from resnet_cifar.outputs import atomic_write

PANELS = (("accuracy", "train accuracy"), ("loss", "train loss"),
          ("test_accuracy", "test accuracy"), ("test_loss", "test loss"))


def load_run(run, log_dir):
    folder = run if os.path.isdir(run) else os.path.join(log_dir, run)
    if not os.path.isdir(folder):
        raise UsageError(f"no run {run!r}: neither a folder nor a run under {log_dir}/ "
                                "(give a log folder or a run name, see --log-dir)")
    config_path = os.path.join(folder, "config.json")
    try:
        config = {}
        if os.path.isfile(config_path):  # the article recipe's history comes without one
            with open(config_path) as f:
                config = json.load(f)
        rows = statistics.read_history(os.path.join(folder, "history.csv"))
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read run {folder}: {error} (is it a training run's log folder?)") from None
    if not rows:
        raise UsageError(f"run {folder} has no completed epoch yet")
    return {"name": config.get("run_name", os.path.basename(os.path.normpath(folder))), "config": config,
            "history": rows}


def table(runs):
    lines = ["| run | model | parameters | checkpoint MB | final test acc | best test acc | epochs | s/epoch |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        history, config = run["history"], run["config"]
        checkpoint = config.get("checkpoint", "")
        size = f"{os.path.getsize(checkpoint) / 1e6:.2f}" if checkpoint and os.path.isfile(checkpoint) else "-"
        accuracies = [row["test_accuracy"] for row in history]
        seconds = sum(row["seconds"] for row in history) / len(history)
        params = f"{config['params']:,}" if "params" in config else "-"
        lines.append(f"| {run['name']} | {config.get('model', '-')} | {params} | {size} | "
                     f"{accuracies[-1]:.4f} | {max(accuracies):.4f} | {len(history)} | {seconds:.1f} |")
    return "\n".join(lines)


def figure(runs, out, zoom):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for (key, title), ax in zip(PANELS, (axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1])):
        for run in runs:
            ax.plot([r["epoch"] + 1 for r in run["history"]], [r[key] for r in run["history"]], label=run["name"])
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    zoomed = axes[0, 2]
    for run in runs:
        tail = run["history"][-zoom:]
        zoomed.plot([r["epoch"] + 1 for r in tail], [r["test_accuracy"] for r in tail], marker=".", label=run["name"])
    shown = min(zoom, max(len(run["history"]) for run in runs))  # a 2-epoch run's panel says 2, not 40
    zoomed.set(title=f"test accuracy, last {shown} epochs", xlabel="epoch")
    zoomed.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    axes[1, 2].axis("off")
    axes[1, 2].text(0, 0.95, "\n".join(f"{run['name']}: final test acc {run['history'][-1]['test_accuracy']:.4f}"
                                       for run in runs), va="top", family="monospace", fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN")
    parser.add_argument("--out", required=True, metavar="FIG.png", help="where to write the figure")
    parser.add_argument("--log-dir", default="logs")
    parser.add_argument("--zoom", type=cli.positive_int, default=40, help="epochs in the zoomed panel")
    with one_line_usage_errors("compare.py"):
        args = parser.parse_args(argv)
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise UsageError(f"--out {args.out!r}: folder {out_dir} does not exist")
        runs = [load_run(run, args.log_dir) for run in args.runs]
        atomic_write(args.out, lambda tmp: figure(runs, tmp, args.zoom))
    print(table(runs))
    print("\n" + statistics.data_sources([{"label": run["name"], "config": run["config"]} for run in runs]))
    groups = [(name, members) for name, members in statistics.group_by_seed(runs) if len(members) > 1]
    if groups:  # runs that differ only in their seed, summarized together
        print("\nRuns that differ only in their seed:\n")
        print(statistics.markdown_table([{"label": f"{name} and {len(members) - 1} more (seeds "
                                               f"{', '.join(str(m['config'].get('seed')) for m in members)})",
                                      "accuracies": [statistics.final_accuracy(m["history"]) for m in members],
                                      "minutes": [statistics.run_minutes(m["history"]) for m in members]}
                                     for name, members in groups]))
    print(f"\nfigure: {args.out}")


if __name__ == "__main__":
    main()
