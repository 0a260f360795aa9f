"""CIFAR-10/100 files: where they are, and how the official "python version" pickles are read.

The batch files are pickles; they are read by an unpickler that accepts numpy arrays and nothing else (as
keras.datasets does), so a hostile file cannot run code. A missing, truncated or malformed batch, images
of the wrong shape or labels out of range are reported as one line naming the file (UsageError).
Without --data-dir the data come through keras.datasets (downloaded once to ~/.keras/datasets).
"""
import gzip
import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import UsageError

IMAGE_SHAPE = (32, 32, 3)


@dataclass(frozen=True)
class Dataset:
    title: str
    classes: int
    folder: str  # the official "python version" layout ...
    archive: str  # ... and the tarball that holds it
    train_files: tuple
    test_files: tuple
    label_key: bytes


DATASETS = {
    "cifar10": Dataset("CIFAR-10", 10, "cifar-10-batches-py", "cifar-10-python.tar.gz",
                       tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels"),
    "cifar100": Dataset("CIFAR-100", 100, "cifar-100-python", "cifar-100-python.tar.gz",
                        ("train",), ("test",), b"fine_labels"),
}


class ArrayOnlyUnpickler(pickle.Unpickler):
    """Reads the CIFAR pickles and refuses everything but numpy arrays (as keras.datasets does):
    loading a hostile file then cannot call any function."""

    ALLOWED = frozenset({
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # numpy < 2
        ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2
        ("_codecs", "encode"),  # array bytes in protocol-2 pickles written by Python 3: text -> bytes only
        ("__builtin__", "bytes"), ("builtins", "bytes"),  # an empty array's bytes in a protocol-2 pickle
    })

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def _read_batch(fileobj, where, label_key, classes):
    try:
        batch = ArrayOnlyUnpickler(fileobj, encoding="bytes").load()
    except Exception as error:  # truncated, corrupt or hostile: the message names the file
        raise UsageError(f"cannot read {where}: {error} (re-download or rebuild the data)") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise UsageError(f"{where} is not a CIFAR batch: it needs b'data' and {label_key!r} "
                         "(is --dataset right?)")
    try:
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key])
    except (ValueError, TypeError) as error:  # ragged lists, mixed types
        raise UsageError(f"{where}: images and labels must be regular arrays ({error}); re-download or rebuild "
                         "the data") from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise UsageError(f"{where}: images must be uint8 rows of 3072 pixels, got {data.dtype} "
                         f"{data.shape} (re-download or rebuild the data)")
    if len(data) == 0:
        raise UsageError(f"{where} holds no images (re-download or rebuild the data)")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise UsageError(f"{where}: expected {len(data)} integer labels, got {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise UsageError(f"{where}: labels must be 0..{classes - 1}, found {labels.min()}..{labels.max()} "
                         "(is --dataset right?)")
    return data, labels.astype(np.int32)


def _as_nhwc(parts):
    """The batches' CHW rows as one uint8 NHWC array, filled one channel plane at a time (3x faster than numpy's
    transposed copy, and no second copy to concatenate)."""
    height, width, channels = IMAGE_SHAPE
    images = np.empty((sum(len(rows) for rows in parts), *IMAGE_SHAPE), np.uint8)
    start = 0
    for rows in parts:
        planes = rows.reshape(len(rows), channels, height * width)
        pixels = images[start:start + len(rows)].reshape(len(rows), height * width, channels)
        for channel in range(channels):
            pixels[:, :, channel] = planes[:, channel]
        start += len(rows)
    return images


def find_local_data(data_dir, dataset):
    """The folder or the tarball of `dataset` under data_dir; UsageError if neither is there."""
    spec = DATASETS[dataset]
    folder = os.path.join(data_dir, spec.folder)
    archive = os.path.join(data_dir, spec.archive)
    if os.path.isdir(folder):
        return folder
    if os.path.isfile(archive):
        return archive
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {data_dir!r} does not exist (give the folder that holds "
                         f"{spec.folder}/ or {spec.archive})")
    if os.path.basename(os.path.normpath(data_dir)) == spec.folder or os.path.isfile(
            os.path.join(data_dir, spec.test_files[0])):  # the inner folder itself
        raise UsageError(f"--data-dir {data_dir!r} is the {spec.folder} folder itself: give the folder that holds "
                         f"it, {os.path.dirname(os.path.normpath(data_dir)) or '.'!r}")
    raise UsageError(f"--data-dir {data_dir!r} holds neither {spec.folder}/ nor {spec.archive} "
                     f"(download {spec.title} 'python version' there)")


def _check_gzip_stream(path):
    """Reads a .gz archive through to its end, so that damage anywhere (the CRC at the end included) is an error
    here: tarfile alone stops quietly at a damaged header in the middle, and its members after it look missing."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return
    with gzip.open(path, "rb") as stream:
        while stream.read(2**22):
            pass


def load_local(source, dataset, files):
    """Concatenated (images, labels) from the official batch files, in a folder or a .tar.gz."""
    spec = DATASETS[dataset]
    parts = []
    if os.path.isdir(source):
        for name in files:
            path = os.path.join(source, name)
            if not os.path.isfile(path):
                raise UsageError(f"{path} is missing (re-download or rebuild the data)")
            with open(path, "rb") as f:
                parts.append(_read_batch(f, path, spec.label_key, spec.classes))
    else:
        try:
            _check_gzip_stream(source)
            with tarfile.open(source, "r:*") as tar:
                members = {member.name: member for member in tar.getmembers()}  # reads the whole archive once:
                for name in files:                                              # corruption shows here
                    where = f"{source}:{spec.folder}/{name}"
                    member = members.get(f"{spec.folder}/{name}")
                    if member is None:
                        raise UsageError(f"{where} is missing (re-download the archive)")
                    if not member.isfile():
                        raise UsageError(f"{where} is not a file (re-download the archive)")
                    parts.append(_read_batch(io.BytesIO(tar.extractfile(member).read()), where, spec.label_key,
                                             spec.classes))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            raise UsageError(f"cannot read {source}: {error} (the archive is damaged: re-download it)") from None
    return _as_nhwc([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_data(config, train=True):
    """((x_train, y_train), (x_test, y_test), validation): uint8 NHWC images and int32 labels. Without
    --data-dir, downloads through keras.datasets. With train=False the training part is (None, None). The
    validation set is None, or with --val-split N the last N images of the training set, held out before
    --train-limit takes the first images of the rest."""
    spec = DATASETS[config.dataset]
    if config.data_dir:
        source = find_local_data(config.data_dir, config.dataset)
        test = load_local(source, config.dataset, spec.test_files)
        trainset = load_local(source, config.dataset, spec.train_files) if train else (None, None)
    else:
        import keras
        loader = keras.datasets.cifar10 if config.dataset == "cifar10" else keras.datasets.cifar100
        try:
            (xa, ya), (xb, yb) = loader.load_data()
        except Exception as error:
            raise UsageError(f"could not download {spec.title} through keras.datasets ({error}); "
                             "fix: pass --data-dir with a local copy") from None
        trainset, test = (xa, ya.reshape(-1).astype(np.int32)), (xb, yb.reshape(-1).astype(np.int32))
    if train and getattr(config, "val_split", None):
        n = config.val_split
        if n >= len(trainset[0]):
            raise UsageError(f"--val-split {n} leaves no training image of {len(trainset[0])} (lower --val-split)")
        validation = (trainset[0][-n:], trainset[1][-n:])
        trainset = (trainset[0][:-n], trainset[1][:-n])
    else:
        validation = None
    if train and config.train_limit:
        trainset = (trainset[0][:config.train_limit], trainset[1][:config.train_limit])
    return trainset, test, validation
