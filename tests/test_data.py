"""The loader reads the official python layout (folder and tar.gz) through an array-only unpickler."""
import argparse
import pickle

import numpy as np
import pytest

from resnet_cifar import cifar_data
from cifar_fixture import batch_dict


def load(data_dir, dataset="cifar10", train_limit=None, train=True):
    return cifar_data.load_data(argparse.Namespace(dataset=dataset, data_dir=data_dir, train_limit=train_limit),
                                train)[:2]


def test_folder_layout(cifar_dir):
    (x, y), (xt, yt) = load(cifar_dir)
    assert x.shape == (320, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (320,)
    assert xt.shape == (100, 32, 32, 3) and yt.dtype == np.int32
    assert set(np.unique(y)) <= set(range(10)) and len(np.unique(y)) > 5


def test_tar_gz_layout(cifar_tar_dir):
    (x, y), (xt, yt) = load(cifar_tar_dir)
    assert x.shape == (100, 32, 32, 3) and xt.shape == (30, 32, 32, 3)


def test_pixels_keep_their_layout(tmp_path):
    """CHW rows become HWC images: one red pixel stays red and where it was."""
    from cifar_fixture import write_cifar
    root = write_cifar(str(tmp_path), per_file=2, test_images=2)
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 3, 7] = (255, 0, 0)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(batch_dict(image, [4], b"labels", "t"), f)
    _, (xt, yt) = load(root, train=False)
    assert (xt[0, 3, 7] == (255, 0, 0)).all() and xt.sum() == 255 and yt.tolist() == [4]


def test_every_image_is_its_rows_transposed_in_file_order(cifar_dir):
    """All training batches, concatenated in file order, each image its CHW row as HWC (channel planes copied)."""
    spec = cifar_data.DATASETS["cifar10"]
    expected = []
    for name in spec.train_files:
        with open(f"{cifar_dir}/{spec.folder}/{name}", "rb") as f:  # the test's own files
            expected.append(pickle.load(f, encoding="bytes")[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    (x, _), _ = load(cifar_dir)
    assert len(expected) == 5 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, np.concatenate(expected))


def test_train_limit(cifar_dir):
    (x, y), (xt, _) = load(cifar_dir, train_limit=50)
    (x_all, y_all), _ = load(cifar_dir)
    assert len(x) == 50 and (x == x_all[:50]).all() and (y == y_all[:50]).all() and len(xt) == 100


def test_cifar100_fine_labels(cifar100_dir):
    (x, y), (xt, yt) = load(cifar100_dir, "cifar100")
    assert x.shape == (100, 32, 32, 3) and y.max() < 100 and len(np.unique(y)) > 20


def test_unpickler_refuses_functions():
    class Hostile:
        def __reduce__(self):
            return (print, ("ran",))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        cifar_data.ArrayOnlyUnpickler(__import__("io").BytesIO(pickle.dumps(Hostile()))).load()
