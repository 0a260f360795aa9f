"""Reproduce a paper's table in one command: every (row, seed) run of an experiment file, then the table
with its statistics beside the published figures, and a figure of the mean curves.

    python reproduce.py experiments/he2016_table2_units.toml                  # the paper's scale, the file's seeds
    python reproduce.py experiments/he2016_table2_units.toml --seeds 0-2 -- --stack-n 3 --epochs 15 \\
        --train-limit 10000 --lr-schedule 0:0.1,8:0.01,12:0.001 --data-dir data   # a reduced scale
    python reproduce.py EXPERIMENT --executor slurm --partition gpu --time 600 --gpus-per-run 1 --cpus-per-run 8
    python reproduce.py EXPERIMENT --print | parallel -j 4     # one command per line, for any scheduler

Flags after `--` go to every run (they come after the row's own flags, so they win). Each run is the family
script itself with --seed (with --vary init or data: --init-seed or --data-seed, the other part held), --run-name (the script's own default name: model, dataset and what differs), and
--log-dir/--checkpoint-dir under --out (default sweeps/<experiment>/). Every row's flags are checked by its
script's own parser before the first run starts.

Idempotent: a finished run is not run again, an interrupted one continues with --resume (its state is saved
after every epoch), so rerunning the same command after a crash or a pre-emption finishes the sweep with each
run exactly once; a second process on a run stops at once (the run's lock). Executors (submitit):
- local: this machine; one run at a time, or with --gpus N one run per GPU (--runs-per-gpu K shares each GPU
  among K runs, with JAX's preallocation and TensorFlow's up-front allocation turned off);
- slurm: one job per run (--partition, --time minutes, --gpus-per-run, --cpus-per-run, --account), the request
  checked against the cluster before anything is submitted. A job warned of its time limit, pre-empted or
  requeued stops its run cleanly (the last complete epoch is kept) and continues it when it starts again; the
  sweep follows its jobs (state, pending reason) and records their ids in <out>/jobs.json, so a rerun follows
  the jobs still queued instead of submitting them twice (docs/reproduce.md, "SLURM").

The table: per row n, mean ± sample std, median and min-max of the final (last-epoch) test accuracy, the
published figure and the difference; printed and written to <out>/table.md, the figure to <out>/curves.png.
"""
import argparse
import json
import os
import re
import shlex
import sys
import tomllib

from resnet_cifar import cli, families, slurm_cluster, statistics, sweep_jobs
from resnet_cifar.cifar_data import find_local_data
from resnet_cifar.errors import UsageError, one_line_usage_errors
from resnet_cifar.outputs import atomic_write, run_paths, write_text
from resnet_cifar.runs import RunLock

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL_TIMEOUT_MIN = 60 * 24 * 30  # submitit's local executor ends a job after its timeout: never, in practice
MAX_TIMEOUTS = 3  # submitit's max_num_timeout: how often a job may reach its time limit and be requeued


def parse_seeds(text):
    """'0-4' -> [0, 1, 2, 3, 4]; '0,2,5' -> [0, 2, 5]; '3' -> [3]; ranges and lists may mix: '0-2,7'."""
    seeds = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise argparse.ArgumentTypeError(f"expected seeds like 0-4 or 0,2,5, got {text!r}")
        first = int(match.group(1))
        seeds.extend(range(first, int(match.group(2) or first) + 1))
    if len(set(seeds)) != len(seeds) or max(seeds) > cli.MAX_SEED:
        raise argparse.ArgumentTypeError(f"seeds must be distinct and at most {cli.MAX_SEED}, got {text!r}")
    return seeds


def load_experiment(path):
    """The experiment file as a dict, checked: title, rows (label, script, flags, optional published), seeds."""
    try:
        with open(path, "rb") as f:
            experiment = tomllib.load(f)
    except OSError as error:
        raise UsageError(f"cannot read experiment {path!r} ({error.strerror}); see experiments/") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"experiment {path} is not valid TOML ({error})") from None
    rows = experiment.get("rows")
    if not isinstance(experiment.get("title"), str) or not isinstance(rows, list) or not rows:
        raise UsageError(f"experiment {path} needs a title and at least one [[rows]] entry")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("label"), str) or row.get("script") not in families.SCRIPTS:
            raise UsageError(f"experiment {path}, row {i}: needs a label and a script, one of {', '.join(families.SCRIPTS)}")
        flags = row.get("flags", [])
        if not isinstance(flags, list) or not all(isinstance(flag, str) for flag in flags):
            raise UsageError(f"experiment {path}, row {i} ({row['label']}): flags must be a list of strings")
        try:
            row["published"] = statistics.published_figure(row.get("published"))
        except ValueError as error:
            raise UsageError(f"experiment {path}, row {i} ({row['label']}): {error} (%)") from None
    seeds = experiment.setdefault("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise UsageError(f"experiment {path}: seeds must be a list of integers >= 0")
    return experiment


VARY = {"both": "the seed (initialization, data order and augmentation)",
        "init": "the initialization only (--init-seed; --data-seed held at the first seed)",
        "data": "the data order and augmentation only (--data-seed; --init-seed held at the first seed)"}


# Settings that do not change what is trained (where it runs, how fast, where it writes, the seeds).
NOT_SCALE = statistics.PER_RUN_KEYS | {"run_name", "backend", "precision", "steps_per_execution", "plain_keras",
                                       "distribute", "lr_scale", "verbose", "data_dir"}


def scale_settings(config):
    """What a run trains, for comparing a sweep's runs with the experiment's own settings: the network, the data,
    the recipe, the options."""
    return {key: value for key, value in config.saved().items() if key not in NOT_SCALE}


def scale_differences(experiment, runs):
    """How the flags after `--` change the experiment: e.g. ["--stack-n 1 instead of 9", "--epochs 3 instead of
    200"], from each row's settings with and without them; [] at the experiment's own scale."""
    differences = []
    one_per_row = {run.label: run for run in runs}.values()  # the seeds are not settings of scale (NOT_SCALE)
    for run in one_per_row:
        row = next(r for r in experiment["rows"] if r["label"] == run.label)
        own = scale_settings(cli.parse(row.get("flags", []), families.load(run.script)))
        for key in sorted(set(own) | set(run.setting)):
            if own.get(key) != run.setting.get(key):
                was = "all" if own.get(key) is None else own.get(key)
                text = f"--{key.replace('_', '-')} {run.setting.get(key)} instead of {was}"
                if text not in differences:
                    differences.append(text)
    return differences


def seed_flags(vary, seed, held):
    """The flags that make one seed of a sweep: --seed, or with vary "init"/"data" that part of it alone, the
    other held at `held`."""
    if vary == "both":
        return ["--seed", str(seed)]
    return ["--seed", str(held), f"--{vary}-seed", str(seed)]


class Run:
    """One (row, seed) of a sweep: its script's command, and where its files are."""

    def __init__(self, row, seed, extra, out, vary="both", held=0):
        self.label, self.seed = row["label"], seed
        self.script = row["script"]
        self.flags = [*row.get("flags", []), *extra, *seed_flags(vary, seed, held),
                      "--log-dir", os.path.join(out, "logs"), "--checkpoint-dir", os.path.join(out, "checkpoints")]
        try:  # the script's own parser: a bad row is refused before anything starts
            config = cli.parse(self.flags, families.load(self.script))
        except UsageError as error:
            raise UsageError(f"row {self.label!r}, seed {seed}: {error}") from None
        if config.data_dir:
            find_local_data(config.data_dir, config.dataset)
        self.name, self.epochs = config.run_name, config.epochs
        self.setting = scale_settings(config)
        paths = run_paths(os.path.join(out, "checkpoints"), os.path.join(out, "logs"), self.name)
        self.files = {"model": paths["h5"], "state": paths["state"], "saved": paths["json"],
                      "history": paths["log_csv"]}
        self.history = self.files["history"]

    def status(self):
        """finished (the model saved, every epoch in the history), interrupted (something saved), or new."""
        return sweep_jobs.run_status(self.files, self.epochs)

    def final_accuracy(self):
        return statistics.final_accuracy(statistics.read_history(self.history))

    def saved_config(self):
        """The run's saved configuration (config.json beside its checkpoint), {} if unreadable."""
        try:
            with open(self.files["saved"]) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def command(self):
        resume = ["--resume"] if self.status() == "interrupted" else []
        return [*self.job().command, *resume]

    def job(self, env=None):
        """The job that runs it: the same command each time, --resume decided when the job starts."""
        command = [sys.executable, os.path.join(HERE, self.script), *self.flags, "--run-name", self.name]
        return sweep_jobs.TrainingJob(command, self.files, self.epochs, env)


def slurm_parameters(args):
    """submitit.SlurmExecutor's parameters for one run per job: what becomes the #SBATCH lines."""
    parameters = {"partition": args.partition, "time": args.time, "gpus_per_node": args.gpus_per_run,
                  "ntasks_per_node": 1, "cpus_per_task": args.cpus_per_run,
                  "signal_delay_s": slurm_cluster.warning_seconds(args.time)}
    if args.account:
        parameters["account"] = args.account
    return parameters


def make_executor(args, folder):
    import cloudpickle
    import submitit
    cloudpickle.register_pickle_by_value(sweep_jobs)  # the job unpickles wherever the node's Python starts
    if args.executor == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_timeouts)
        executor.update_parameters(**slurm_parameters(args))
        return sweep_jobs.SlurmJobs(executor, folder, os.path.dirname(folder))
    executor = submitit.AutoExecutor(folder=folder, cluster="local")
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
    return sweep_jobs.LocalJobs(executor, args.gpus, args.runs_per_gpu)


def run_sweep(runs, args, out):
    """Runs every run that is not finished and follows each to its end; returns how many failed."""
    pending = [run for run in runs if run.status() != "finished"]
    done = len(runs) - len(pending)
    print(f"{args.experiment}: {len(runs)} runs, {done} finished, {len(pending)} to run ({args.executor})", flush=True)
    if not pending:
        return 0
    jobs = make_executor(args, os.path.join(out, "submitit"))
    slots = max(1, args.gpus * args.runs_per_gpu) if args.executor == "local" else len(pending)
    return sweep_jobs.follow(jobs, pending, len(runs), done, slots)


def table(experiment, runs):
    rows = []
    for row in experiment["rows"]:
        mine = [r for r in runs if r.label == row["label"] and r.status() == "finished"]
        histories = [statistics.read_history(r.history) for r in mine]
        rows.append({"label": row["label"], "published": row.get("published"), "histories": histories,
                     "accuracies": [statistics.final_accuracy(h) for h in histories],
                     "minutes": [statistics.run_minutes(h) for h in histories],
                     "configs": [r.saved_config() for r in mine]})
    return rows


def row_label(experiment, text):
    """--against's row: its label, or its number (1-based) in the experiment file."""
    labels = [row["label"] for row in experiment["rows"]]
    if text in labels:
        return text
    if text.isdigit() and 1 <= int(text) <= len(labels):
        return labels[int(text) - 1]
    raise UsageError(f"--against {text!r}: no such row; give a label or a number from 1 to {len(labels)}: "
                     + ", ".join(f"{i} {label!r}" for i, label in enumerate(labels, 1)))


def report(experiment, vary, rows, reduced, against=None):
    """The table's text: its heading, the table, what the statistics are, the data, and with --against the
    differences and tests."""
    scale = ("\n\nReduced scale: " + ", ".join(reduced) + ". Not the experiment's settings: no difference from "
             "the published figures is printed." if reduced else "")
    text = (f"{experiment['title']} ({experiment.get('paper', '')}, {experiment.get('table', '')}){scale}\n\n"
            + statistics.markdown_table(rows, reduced) + "\n\n"
            + f"Final (last-epoch) test accuracy over seeds of {VARY[vary]}; 95 % CI: Student's t interval of "
            "the mean; published: "
            f"{experiment.get('published', {}).get('statistic', 'as printed')}; \"ours, same statistic\": our "
            "figure of the statistic the paper printed (for one run or an unnamed statistic, our mean).\n\n"
            + statistics.data_sources([{"label": row["label"], "config": config} for row in rows
                                       for config in row["configs"]]) + "\n")
    if against:
        text += (f"\nAgainst {against} (Welch's t-test, two-sided; differences in points):\n\n"
                 + statistics.against_table(rows, against) + "\n")
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", metavar="EXPERIMENT", help="an experiment file, e.g. experiments/*.toml")
    parser.add_argument("--seeds", type=parse_seeds, help="e.g. 0-4 or 0,2,5 (default: the file's seeds)")
    parser.add_argument("--rows", type=parse_seeds, metavar="NUMBERS",
                        help="run and tabulate these rows only, by number in the file: e.g. 1-8 or 1,3")
    parser.add_argument("--against", metavar="ROW",
                        help="a row's label or number: the table adds, for every other row, the difference of mean "
                             "accuracies with its 95 %% interval and Welch's t-test p-value (scipy.stats)")
    parser.add_argument("--vary", choices=sorted(VARY), default="both",
                        help="what the seeds vary: " + "; ".join(f"{k}: {v}" for k, v in VARY.items()))
    parser.add_argument("--out", metavar="DIR", help="where the runs' logs/ and checkpoints/ go "
                                                     "(default sweeps/<experiment>)")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--print", action="store_true", help="print the pending runs' commands, one a line; run none")
    parser.add_argument("--gpus", type=cli._int_at_least(0), default=0, metavar="N",
                        help="local: GPUs on this machine, one run each at a time (0: one run at a time)")
    parser.add_argument("--runs-per-gpu", type=cli.positive_int, default=1, metavar="K")
    slurm = parser.add_argument_group("slurm")
    slurm.add_argument("--partition", help="checked before anything is submitted, with the sizes below")
    slurm.add_argument("--time", type=cli.positive_int, default=24 * 60, metavar="MINUTES",
                       help="per job, at most the partition's MaxTime; the time-limit warning comes "
                            "min(300 s, time / 4) before it, and the job is requeued with its run resumed")
    slurm.add_argument("--max-timeouts", type=cli._int_at_least(0), default=MAX_TIMEOUTS, metavar="N",
                       help="how many times one job may reach its time limit and be requeued (default %(default)s)")
    slurm.add_argument("--gpus-per-run", type=cli._int_at_least(0), default=1, metavar="N")
    slurm.add_argument("--cpus-per-run", type=cli.positive_int, default=8, metavar="N")
    slurm.add_argument("--account")
    with one_line_usage_errors("reproduce.py"):
        try:
            args = parser.parse_args(argv)
            experiment = load_experiment(args.experiment)
            if args.rows:
                if max(args.rows) > len(experiment["rows"]):
                    raise UsageError(f"--rows: the experiment has {len(experiment['rows'])} rows")
                experiment["rows"] = [experiment["rows"][i - 1] for i in args.rows]
            against = row_label(experiment, args.against) if args.against else None
            name = os.path.splitext(os.path.basename(args.experiment))[0]
            out = args.out or os.path.join("sweeps", name)
            # seed by seed, every row each time: a sweep stopped part-way has every row at the same number of seeds
            seeds = args.seeds or experiment["seeds"]
            runs = [Run(row, seed, extra, out, args.vary, seeds[0]) for seed in seeds for row in experiment["rows"]]
            if len({r.name for r in runs}) < len(runs):
                raise UsageError("two rows of the experiment give the same run (same script and flags): "
                                 "make them differ")
            if args.print:
                for run in runs:
                    if run.status() != "finished":
                        print(shlex.join(run.command()))
                return
            if args.executor == "slurm":
                if not args.partition:
                    raise UsageError("--executor slurm needs --partition (and --time, --gpus-per-run, maybe "
                                     "--account)")
                slurm_cluster.check_request(args.partition, args.cpus_per_run, args.gpus_per_run, args.time)
            os.makedirs(out, exist_ok=True)
            with RunLock(out, "sweep", f"a sweep into {out} is following its runs in another process"):
                failed = run_sweep(runs, args, out)
        except KeyboardInterrupt:
            jobs = (f"; its SLURM jobs go on (ids in {os.path.join(out, 'jobs.json')}), scancel them to stop them"
                    if args.executor == "slurm" else "")
            print(f"reproduce.py: interrupted{jobs}; rerun the same command to continue", file=sys.stderr)
            sys.exit(130)
    rows = table(experiment, runs)
    reduced = scale_differences(experiment, runs)
    text = report(experiment, args.vary, rows, reduced, against)
    print("\n" + text)
    write_text(os.path.join(out, "table.md"), text)
    atomic_write(os.path.join(out, "curves.png"),
                 lambda tmp: statistics.mean_curves_figure(
                     rows, tmp, experiment["title"] + ("\nreduced scale: " + ", ".join(reduced) if reduced else "")))
    print(f"table: {os.path.join(out, 'table.md')}, figure: {os.path.join(out, 'curves.png')}")
    if failed:
        print(f"reproduce.py: {failed} runs failed; rerun the same command to retry them", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
