"""A run's settings, resolved once: what the command line asked for, with the family's and the recipe's
defaults filled in, --lr-scale applied, the backend, precision and steps per execution decided. Immutable
(a frozen dataclass): the training loop reads it, and it is what every run saves (config.json beside the
checkpoint and in the log folder). Change "how a run's settings are saved" here.

Import-safe and framework-free: it is built before any framework starts, so a bad setting is one line.
"""
import argparse
import dataclasses
import types
from dataclasses import dataclass, field

from . import devices, recipe, runs
from .errors import UsageError

# Flags that choose what the command does rather than how a run trains: never saved.
MODES = ("summary", "evaluate", "resume", "overwrite", "any_epochs_name")


@dataclass(frozen=True)
class RunConfig:
    # data
    dataset: str
    data_dir: object
    train_limit: object
    val_split: object
    # the recipe (family defaults filled in; lr_schedule after --lr-scale)
    epochs: int
    batch_size: int
    lr_schedule: tuple
    weight_decay: float
    seed: int
    init_seed: int  # the weights' initialization: --init-seed, else --seed
    data_seed: int  # the data order and every augmentation draw: --data-seed, else --seed
    # today's options (None / 0: off; docs/recipe.md)
    lr_decay: str  # "step" (the papers') or "cosine"
    warmup_epochs: int
    cutout: object
    mixup: object
    cutmix: object
    label_smoothing: object
    ema: object
    tta: object
    # speed
    backend: str
    precision: str
    steps_per_execution: int
    plain_keras: bool
    # scale out
    distribute: bool
    lr_scale: float
    cpu_devices: object
    coordinator: object
    num_processes: object
    process_id: object
    wait_timeout: float
    # outputs
    run_name: str
    log_dir: str
    checkpoint_dir: str
    verbose: object
    # what the command does
    summary: bool = False
    evaluate: object = None
    resume: bool = False
    overwrite: bool = False
    any_epochs_name: object = None  # the default run name as a pattern over --epochs (runs.find_run_to_resume)
    # the family script's own flags (depth, unit, ...), resolved; read as attributes: config.stack_n
    family: types.MappingProxyType = field(default_factory=lambda: types.MappingProxyType({}))

    def __getattr__(self, name):  # only called for names that are not fields: the family's flags
        if name.startswith("__") or name == "family":
            raise AttributeError(name)
        try:
            return self.family[name]
        except KeyError:
            raise AttributeError(f"RunConfig has no setting {name!r}") from None

    def saved(self):
        """The settings as a run saves them (JSON-ready): the family's flags beside the common ones."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in MODES and f.name != "family"}
        values["lr_schedule"] = recipe.format_lr_schedule(self.lr_schedule, self.lr_decay)
        return {**dict(self.family), **values}


COMMON = {f.name for f in dataclasses.fields(RunConfig)} - {"family", "backend"}


def resolve(args, family_resolve=None, run_name=None):
    """The RunConfig of parsed `args` (an argparse.Namespace, only read). family_resolve(args) returns the
    family's resolved values (its own flags' defaults, a recipe of its own) or raises UsageError;
    run_name(settings) gives the model part of the default run name, e.g. "resnet32_e"."""
    values = {**vars(args), **(family_resolve(args) if family_resolve else {})}
    for key, default in recipe.DEFAULTS.items():
        if values.get(key) is None:
            values[key] = default
    if values["lr_schedule"] == recipe.COSINE or (isinstance(values["lr_schedule"], tuple)
                                                   and values["lr_schedule"][0] == recipe.COSINE):
        peak = values["lr_schedule"][1] if isinstance(values["lr_schedule"], tuple) else None
        unset = family_resolve(argparse.Namespace(**{**vars(args), "lr_schedule": None})) if family_resolve else {}
        default_peak = unset.get("lr_schedule", recipe.DEFAULTS["lr_schedule"])[0][1]
        values["lr_schedule"], values["lr_decay"] = ((0, peak or default_peak),), "cosine"
    else:
        values["lr_decay"] = "step"
    values["lr_schedule"] = tuple((epoch, lr * values["lr_scale"]) for epoch, lr in values["lr_schedule"])
    values["init_seed"] = values["seed"] if values["init_seed"] is None else values["init_seed"]
    values["data_seed"] = values["seed"] if values["data_seed"] is None else values["data_seed"]
    check_options(values)
    backend = devices.backend_name()
    values["precision"] = devices.resolve_precision(values["precision"], backend)
    values["steps_per_execution"] = devices.resolve_steps_per_execution(
        values["steps_per_execution"], backend, values["distribute"])
    common = {key: values.pop(key) for key in list(values) if key in COMMON}
    config = RunConfig(backend=backend, family=types.MappingProxyType(values), **common)
    if config.run_name is None and run_name is not None:
        name_parts = (run_name(config), config.dataset, values_of(config), family_defaults(args, family_resolve))
        config = dataclasses.replace(config, run_name=runs.default_run_name(*name_parts),
                                     any_epochs_name=runs.any_epochs_pattern(*name_parts))
    return config


def check_options(values):
    """UsageError for options that cannot go together."""
    if values["mixup"] and values["cutmix"]:
        raise UsageError("--mixup and --cutmix mix each batch in two different ways: choose one")
    if values["lr_decay"] == "cosine" and values["warmup_epochs"] >= values["epochs"]:
        raise UsageError(f"--warmup-epochs {values['warmup_epochs']} leaves no epoch of the cosine schedule in "
                         f"--epochs {values['epochs']} (use fewer warm-up epochs)")


NAMED = ("seed", "init_seed", "data_seed", "epochs", "lr_schedule", "lr_decay", "weight_decay", "batch_size",
         "train_limit", "val_split", "cutout", "mixup", "cutmix", "label_smoothing", "warmup_epochs", "ema", "tta")


def values_of(config):
    return {key: getattr(config, key) for key in NAMED}


def family_defaults(args, family_resolve):
    """What the recipe settings would be with none of them given on the command line (for the run name)."""
    unset = argparse.Namespace(**{**vars(args), "epochs": None, "lr_schedule": None, "weight_decay": None})
    resolved = family_resolve(unset) if family_resolve else {}
    defaults = {key: resolved.get(key, default) for key, default in recipe.DEFAULTS.items()}
    return {**defaults, "seed": recipe.SEED, "batch_size": recipe.BATCH_SIZE, "lr_decay": "step"}
