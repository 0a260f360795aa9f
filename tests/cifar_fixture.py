"""Tiny CIFAR data in the official "python version" format, made by the tests themselves."""
import os
import pickle
import tarfile

import numpy as np

from resnet_cifar import cifar_data


def learnable_images(labels, rng):
    """32x32 RGB images whose class shows as a colour and a bright quadrant: a network learns it in a few steps."""
    n = len(labels)
    hue = (np.arange(10)[:, None] * np.array([37, 91, 151]) % 256).astype(np.float32)
    images = rng.normal(128, 30, size=(n, 32, 32, 3))
    images += 0.5 * (hue[labels % 10][:, None, None, :] - 128)
    quadrant = labels % 4
    for q in range(4):
        rows, cols = divmod(q, 2)
        images[quadrant == q, rows * 16:rows * 16 + 16, cols * 16:cols * 16 + 16, :] += 60
    return np.clip(images, 0, 255).astype(np.uint8)


def batch_dict(images, labels, label_key, name):
    return {b"batch_label": name.encode(), label_key: [int(v) for v in labels],
            b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))]}


def write_cifar(root, dataset="cifar10", per_file=40, test_images=60, seed=0, tar=False):
    """Writes root/<folder>/ (or root/<archive> when tar=True) with the dataset's files; returns root."""
    spec = cifar_data.DATASETS[dataset]
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, spec.folder)
    os.makedirs(folder, exist_ok=True)
    files = [(name, per_file) for name in spec.train_files] + [(name, test_images) for name in spec.test_files]
    for name, n in files:
        labels = rng.integers(0, spec.classes, size=n)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch_dict(learnable_images(labels, rng), labels, spec.label_key, name), f, protocol=2)
    if tar:
        with tarfile.open(os.path.join(root, spec.archive), "w:gz") as archive:
            archive.add(folder, arcname=spec.folder)
        for name, _ in files:
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
    return root
