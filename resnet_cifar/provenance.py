"""Which data a run used: a fingerprint of the images and labels as loaded (`data_fingerprint`), and whether the
files are the official CIFAR-10/100 (`official_data`), from the MD5 checksums published with the official
"python version" archives (https://www.cs.toronto.edu/~kriz/cifar.html; the same ones torchvision checks).

A copy re-encoded or rebuilt in any way (this project's JPEG-derived copy, for instance) has other bytes, so it
is not official, whatever its layout; its figures sit below published ones (docs/fidelity.md). Without
--data-dir the data come through keras.datasets, which checks the official archive's SHA-256 before it reads
it: official. Every run records both (config.json, TensorBoard's HParams) and reproduce.py's tables show them.
Import-safe: no framework.
"""
import hashlib
import os

import numpy as np

from .cifar_data import DATASETS, find_local_data

# The official archives' and their files' MD5 checksums, as published.
OFFICIAL_MD5 = {
    "cifar10": {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
    "cifar100": {
        "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    },
}
FINGERPRINT_DIGITS = 16  # of the SHA-256: enough to tell data sources apart in a table


def md5_of(path):
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(2**22):
            digest.update(block)
    return digest.hexdigest()


def is_official(data_dir, dataset):
    """True when the files a run reads are the official ones: every batch file of the folder (or the archive)
    under data_dir has its published MD5; without data_dir (keras.datasets checked the archive), True."""
    if not data_dir:
        return True
    source = find_local_data(data_dir, dataset)
    spec, official = DATASETS[dataset], OFFICIAL_MD5[dataset]
    if not os.path.isdir(source):
        return md5_of(source) == official[spec.archive]
    return all(md5_of(os.path.join(source, name)) == official[name] for name in (*spec.train_files, *spec.test_files))


def fingerprint(data):
    """The SHA-256 (first FINGERPRINT_DIGITS hex digits) of the training, validation and test images and labels
    as a run loaded them (after --val-split and --train-limit): equal for equal data, whatever the files."""
    digest = hashlib.sha256()
    (x, y), (x_test, y_test), validation = data
    for array in (x, y, *(validation or ()), x_test, y_test):
        digest.update(f"{array.shape} {array.dtype}".encode())
        digest.update(np.ascontiguousarray(array))
    return digest.hexdigest()[:FINGERPRINT_DIGITS]


def of_run(config, data):
    """{"data_fingerprint", "official_data"} of a run's data."""
    return {"data_fingerprint": fingerprint(data), "official_data": is_official(config.data_dir, config.dataset)}
