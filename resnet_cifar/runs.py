"""A run's identity and ownership: the default run name (what makes a run different), the checks on a given
--run-name, one process per run (a lock), and the refusal to start over another run's files.

All of it runs before any framework starts and before anything is written: a refusal is one line, exit 2,
and every file that existed before is left byte-identical.
"""
import errno
import fcntl
import hashlib
import json
import os
import re

from .errors import UsageError

MAX_RUN_NAME = 120  # "<name>.state.weights.h5" and its ".tmp-XXXXXXXX-" temporary stay far below 255 bytes
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")  # one path component, no hidden file, no "..", no "/"


def check_run_name(name):
    """UsageError unless `name` is a safe file name of at most MAX_RUN_NAME characters."""
    if not RUN_NAME.fullmatch(name) or len(name) > MAX_RUN_NAME:
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise UsageError(f"--run-name {shown!r} must be 1 to {MAX_RUN_NAME} characters of letters, digits and "
                         "._+=- starting with a letter or digit (it names files and folders)")
    return name


def schedule_tag(schedule):
    """A short, stable tag of a learning-rate schedule: 'lr' and six hex digits of its text's SHA-256."""
    text = ",".join(f"{epoch}:{lr!r}" for epoch, lr in schedule)
    return "lr" + hashlib.sha256(text.encode()).hexdigest()[:6]


def default_run_name(model, dataset, settings, defaults):
    """<model>_<dataset>, then what differs from the family's defaults, in a fixed order:
    _s<seed> _e<epochs> _lr<hash of the schedule> (_cos with --lr-schedule cosine, _cos<peak> with another peak)
    _wd<weight decay> _b<batch> _n<training images> _v<validation images>, then today's options when set:
    _co<cutout size> _mu<mixup alpha> _cm<cutmix alpha> _ls<label smoothing> _wu<warm-up epochs> _ema<decay>
    _tta<kind> _i<init seed> _d<data seed> (the last two when they differ from the seed).
    E.g. resnet32_e_cifar10 (the defaults), resnet20_e_cifar10_s1_e2_n2000, resnet56_e_cifar10_cos_co16_mu1."""
    parts = [model, dataset]
    if settings["seed"] != defaults["seed"]:
        parts.append(f"s{settings['seed']}")
    if settings["epochs"] != defaults["epochs"]:
        parts.append(f"e{settings['epochs']}")
    if settings.get("lr_decay") == "cosine":
        peak = settings["lr_schedule"][0][1]
        parts.append("cos" if peak == defaults["lr_schedule"][0][1] else f"cos{peak:g}")
    elif tuple(settings["lr_schedule"]) != tuple(defaults["lr_schedule"]):
        parts.append(schedule_tag(settings["lr_schedule"]))
    if settings["weight_decay"] != defaults["weight_decay"]:
        parts.append(f"wd{settings['weight_decay']:g}")
    if settings["batch_size"] != defaults["batch_size"]:
        parts.append(f"b{settings['batch_size']}")
    if settings["train_limit"] is not None:
        parts.append(f"n{settings['train_limit']}")
    if settings.get("val_split") is not None:
        parts.append(f"v{settings['val_split']}")
    for key, tag in OPTION_TAGS:
        if settings.get(key):
            parts.append(f"{tag}{settings[key]:g}" if isinstance(settings[key], (int, float)) else tag + settings[key])
    for key, tag in (("init_seed", "i"), ("data_seed", "d")):
        if settings.get(key, settings["seed"]) != settings["seed"]:
            parts.append(f"{tag}{settings[key]}")
    return "_".join(parts)


# today's options in the run name, in this order (default_run_name)
OPTION_TAGS = (("cutout", "co"), ("mixup", "mu"), ("cutmix", "cm"), ("label_smoothing", "ls"),
               ("warmup_epochs", "wu"), ("ema", "ema"), ("tta", "tta"))


EPOCHS_SENTINEL = 987654321  # stands for "any --epochs" in a default name: no real run trains that long


def any_epochs_pattern(model, dataset, settings, defaults):
    """A regular expression matching the default run name of these settings at any --epochs (the part
    _e<epochs>, or its absence at the family's default epochs)."""
    name = default_run_name(model, dataset, {**settings, "epochs": EPOCHS_SENTINEL}, defaults)
    return re.escape(name).replace(re.escape(f"_e{EPOCHS_SENTINEL}"), r"(_e[0-9]+)?")


def find_run_to_resume(config):
    """`config`, or with --resume and a default run name that has no saved state, `config` renamed to the one run
    of the same settings saved with another --epochs (so `--epochs 3 --resume` continues a finished 2-epoch run,
    in that run's files). UsageError if several such runs exist."""
    import dataclasses
    state = ".state.weights.h5"
    if (not config.resume or config.any_epochs_name is None
            or os.path.exists(os.path.join(config.checkpoint_dir, config.run_name + state))):
        return config
    pattern = re.compile(config.any_epochs_name)
    try:
        names = os.listdir(config.checkpoint_dir)
    except OSError:
        return config
    found = sorted(n[:-len(state)] for n in names if n.endswith(state) and pattern.fullmatch(n[:-len(state)]))
    if not found:
        return config
    if len(found) > 1:
        raise UsageError(f"--resume: {', '.join(found)} were all saved with these settings and other --epochs; "
                         "give the one to continue with --run-name")
    print(f"resuming run {found[0]} (saved with other --epochs) to {config.epochs} epochs, in its own files")
    return dataclasses.replace(config, run_name=found[0])


class RunLock:
    """An exclusive fcntl lock on <checkpoint_dir>/<run>.lock for this process's lifetime: a second process on
    the same run (or on the same sweep, with `busy` saying so) stops at once. The kernel releases it on any exit (a crash or kill -9 included), so a lock
    file left behind is never stale."""

    def __init__(self, checkpoint_dir, name, busy=None):
        self.path = os.path.join(checkpoint_dir, f"{name}.lock")
        self.busy = busy or f"run {name!r} is in progress in another process"
        self.or_else = "" if busy else ", or choose another --run-name"
        self.fd = None

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UsageError(f"{self.busy} (lock {self.path}); wait for it to end{self.or_else}") from None
            raise UsageError(f"cannot lock {self.path} ({error.strerror}); choose another --checkpoint-dir") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the empty file stays (removing it would race a waiting run)
            self.fd = None


def existing_run(paths):
    """What of a run is already on disk: (its saved configuration or None, completed epochs or None, the files)."""
    found = [paths[k] for k in ("json", "state", "h5", "keras", "csv") if os.path.exists(paths[k])]
    log_files = [os.path.join(paths["log_run"], n) for n in ("config.json", "history.csv")]
    found += [p for p in log_files if os.path.exists(p)]
    config = None
    try:
        with open(paths["json"]) as f:
            config = json.load(f)
    except (OSError, ValueError):
        pass
    return config if isinstance(config, dict) else None, found


def refuse_to_clobber(paths, name, resume, overwrite):
    """UsageError when a fresh run (no --resume, no --overwrite) would write over files of a run of that name."""
    if resume or overwrite:
        return
    config, found = existing_run(paths)
    if not found:
        return
    state = "finished" if os.path.exists(paths["h5"]) else "interrupted or in progress"
    what = f" ({config.get('epochs')} epochs, seed {config.get('seed')})" if config else ""
    raise UsageError(f"run {name!r} already has files ({state}{what}, e.g. {found[0]}): pass --resume to continue "
                     "it, --run-name to start another, or --overwrite to replace it")
