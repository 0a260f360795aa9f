"""What a run writes besides its checkpoints: the history (CSV), the configuration (JSON), TensorBoard
scalars and the `final:` line; and how every file of a run is written, atomically.

Every file goes to a temporary name in its folder and is renamed over the old one (atomic on POSIX), so
a kill at any moment leaves the previous file whole; a killed run's temporaries are removed on the next
start. The TensorBoard files are written with the tensorboard package alone, so they need no TensorFlow.
"""
import csv
import io
import math
import os
import shutil
import tempfile
import time

from .errors import TrainingError, UsageError


# A run's files: the checkpoint folder's (the model twice, history, configuration, resume state) and the
# log folder's (TensorBoard events under train/ and test/, history and configuration again for compare.py).
CHECKPOINT_FILES = ("h5", "keras", "csv", "json", "state")


def run_paths(checkpoint_dir, log_dir, name):
    return {"h5": os.path.join(checkpoint_dir, f"{name}.h5"),
            "keras": os.path.join(checkpoint_dir, f"{name}.keras"),
            "csv": os.path.join(checkpoint_dir, f"{name}.csv"),
            "json": os.path.join(checkpoint_dir, f"{name}.json"),
            "state": os.path.join(checkpoint_dir, f"{name}.state.weights.h5"),
            "log_run": os.path.join(log_dir, name),
            "log_csv": os.path.join(log_dir, name, "history.csv"),
            "log_json": os.path.join(log_dir, name, "config.json")}


def private_run_paths(folder, name):
    """run_paths inside `folder` (a temporary folder): where a process other than the chief writes the same
    files as the chief, since saving reads variables and may take part in collectives every worker must join."""
    paths = run_paths(os.path.join(folder, "checkpoints"), os.path.join(folder, "logs"), name)
    for path in (os.path.dirname(paths["h5"]), paths["log_run"]):
        os.makedirs(path, exist_ok=True)
    return paths


MIN_FREE_BYTES = 32 * 2**20  # a run's smallest files (configuration, history, ResNet-8's checkpoints) fit many times


def check_writable_dir(path, flag):
    """UsageError unless `path` is (or can be made) a writable folder with MIN_FREE_BYTES free."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file, not a folder (choose another {flag})")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path!r} is not writable ({error.strerror}); choose another {flag}") from None
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise UsageError(f"{flag} {path!r} is full ({free / 2**20:.1f} MB free, at least "
                         f"{MIN_FREE_BYTES // 2**20} MB needed): free some space or choose another {flag}")


def check_free_space(folder, needed):
    """TrainingError when the device of `folder` has fewer than `needed` bytes free: checked before every
    checkpoint, since h5py may crash the process on a full disk instead of raising."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise TrainingError(no_space_message(folder, free, needed))


def no_space_message(folder, free=None, needed=None):
    free = shutil.disk_usage(folder).free if free is None else free
    wanted = f", {needed / 2**20:.1f} MB needed" if needed else ""
    return (f"no space left in {folder} ({free / 2**20:.1f} MB free{wanted}); every completed epoch is saved: "
            "free some space, then rerun the same command with --resume")


TMP_PREFIX = ".tmp-"


def atomic_write(path, write):
    """write(tmp_path) produces the file; it appears under `path` only once complete (os.replace is atomic),
    so a crash or a kill mid-write leaves any previous file at `path` intact. The temporary name keeps the
    final name's ending (Keras picks the format from it): .tmp-XXXX-<name>."""
    directory, base = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=f"-{base}", dir=directory or ".")
    os.close(fd)
    os.remove(tmp)  # Keras and h5py want to create the file themselves
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(directory, filenames):
    """Temporaries a killed run left behind for these exact file names (another run's, e.g. the same model
    on cifar100, are left alone): never a complete file, safe to delete."""
    for entry in os.listdir(directory):
        if entry.startswith(TMP_PREFIX) and entry.split("-", 2)[-1] in filenames:
            os.remove(os.path.join(directory, entry))


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


HISTORY_FIELDS = ("epoch", "loss", "accuracy", "test_loss", "test_accuracy", "learning_rate", "seconds")
VALIDATION_FIELDS = ("val_loss", "val_accuracy")  # with --val-split; test_* is then the last epoch's only (nan before)
EVALUATION_FIELD = "evaluation"  # with --ema / --tta: how test_* and val_* were evaluated (evaluation.describe)


def write_history(path, history):
    out = io.StringIO()
    fields = HISTORY_FIELDS + (VALIDATION_FIELDS if history and "val_loss" in history[0] else ()) \
        + ((EVALUATION_FIELD,) if history and EVALUATION_FIELD in history[0] else ())
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(path, out.getvalue())


class ScalarLog:
    """TensorBoard scalars per epoch, written through the tensorboard package alone, never through TensorFlow
    (Keras's TensorBoard callback needs TensorFlow, which a JAX or PyTorch run must not import). Train and test curves go to
    <run>/train and <run>/test with the same tags, so TensorBoard draws them on one chart."""

    def __init__(self, run_dir, hparams=None):
        from .workarounds import tensorboard_without_tensorflow
        tensorboard_without_tensorflow()
        self.run_dir, self.writers = run_dir, {}
        if hparams:
            self._add("", 0, hparams_start_summary(hparams))  # the HParams session: the run folder itself

    def _add(self, split, step, summary):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        if split not in self.writers:  # a folder per split, made when it has something to hold
            self.writers[split] = EventFileWriter(os.path.join(self.run_dir, split))
        self.writers[split].add_event(Event(wall_time=time.time(), step=step, summary=summary))
        self.writers[split].flush()

    def write(self, row):
        from tensorboard.compat.proto.summary_pb2 import Summary
        scalars = {"train": {"epoch_loss": row["loss"], "epoch_accuracy": row["accuracy"],
                             "epoch_learning_rate": row["learning_rate"]},
                   "test": {"epoch_loss": row["test_loss"], "epoch_accuracy": row["test_accuracy"]},
                   "val": {"epoch_loss": row.get("val_loss"), "epoch_accuracy": row.get("val_accuracy")}}
        for split, values in scalars.items():
            values = {tag: float(v) for tag, v in values.items() if v is not None and math.isfinite(v)}
            if values:
                self._add(split, row["epoch"], Summary(value=[Summary.Value(tag=tag, simple_value=v)
                                                              for tag, v in values.items()]))

    def finish(self, history):
        """The HParams session ends: TensorBoard's HPARAMS tab shows the run as done, with its last metrics."""
        self._add("", len(history), hparams_end_summary())

    def close(self):
        for writer in self.writers.values():
            writer.close()


# What a run reports to TensorBoard's HPARAMS tab: the settings that tell runs of a sweep apart, and the
# family script's own flags (RunConfig.family: depth, unit, ...).
HPARAMS = ("model", "dataset", "seed", "epochs", "lr_schedule", "weight_decay", "precision", "batch_size",
           "train_images", "val_split", "backend", "init_seed", "data_seed", "lr_decay", "warmup_epochs", "cutout",
           "mixup", "cutmix", "label_smoothing", "ema", "tta", "data_fingerprint", "official_data")


def hparams_of(record, family_flags=()):
    """The HPARAMS entries and `family_flags` of a run's saved configuration: numbers, booleans and strings,
    None left out."""
    return {key: record[key] if isinstance(record[key], (bool, int, float, str)) else str(record[key])
            for key in (*HPARAMS, *family_flags) if record.get(key) is not None}


def _hparams_summary(tag, plugin_data):
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata
    content = plugin_data.SerializeToString()
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def hparams_start_summary(hparams):
    """The session-start summary of TensorBoard's hparams plugin, built from its protos (its own helper goes
    through TensorFlow)."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2
    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key, value in hparams.items():
        if isinstance(value, bool):
            info.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[key].number_value = value
        else:
            info.hparams[key].string_value = value
    return _hparams_summary(metadata.SESSION_START_INFO_TAG,
                            plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION,
                                                              session_start_info=info))


def hparams_end_summary():
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    return _hparams_summary(metadata.SESSION_END_INFO_TAG,
                            plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION,
                                                              session_end_info=info))


def final_line(**fields):
    return "final: " + " ".join(f"{key}={value}" for key, value in fields.items())


def clear_old_events(run_dir):
    """A fresh run under an existing name replaces that run's TensorBoard curves instead of mixing in."""
    for split in ("train", "test", "val", ""):
        folder = os.path.join(run_dir, split)
        if os.path.isdir(folder):
            for entry in os.listdir(folder):
                if entry.startswith("events.out.tfevents."):
                    os.remove(os.path.join(folder, entry))
