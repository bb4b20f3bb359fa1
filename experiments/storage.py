"""Where each experiment's files go, and writing, reading and hashing them: each file appears complete or not at
all, and every input file is checked against its SHA-256 before it is read."""

import dataclasses
import hashlib
import io
import json
import os
import platform
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path

import numpy
import pandas as pd
import torch

from . import parallel

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATA_DIR = ROOT / "data"


class DataError(RuntimeError):
    """A data source or a prepared file is not what it should be."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Outputs:
    """The files of one experiment ("mlp", "transformer", "text") under `root`: the MLP's table and figure at the
    top, where the README leads with them; everything else under results/."""
    experiment: str
    root: Path = ROOT

    def _file(self, suffix: str) -> Path:
        return Path(self.root) / "results" / f"{self.experiment}{suffix}"

    @property
    def summary(self) -> Path:
        return Path(self.root) / "results.csv" if self.experiment == "mlp" else self._file(".csv")

    @property
    def figure(self) -> Path:
        top = self.experiment == "mlp"
        return Path(self.root) / "parameters_vs_accuracy.png" if top else self._file("_parameters_vs_accuracy.png")

    @property
    def per_seed(self) -> Path:
        return self._file("_per_seed.csv")

    @property
    def config(self) -> Path:
        return self._file("_config.json")

    @property
    def test_correct(self) -> Path:
        return self._file("_test_correct.csv")

    @property
    def lr_search(self) -> Path:
        return self._file("_lr_search.csv")

    @property
    def learning_rates(self) -> Path:
        return self._file("_learning_rates.json")

    def all(self) -> list[Path]:
        return [self.summary, self.per_seed, self.test_correct, self.config, self.figure, self.lr_search,
                self.learning_rates]


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: `path` is either old or complete, never torn."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fingerprint(payload, files: list[Path]) -> str:
    """16 hex digits naming a run cache: JSON-able `payload` (config, device, ...) and the bytes of `files`."""
    code = hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()
    return hashlib.sha256(json.dumps([payload, code], sort_keys=True).encode()).hexdigest()[:16]


def cached(path: Path, compute: Callable[[], dict]) -> dict:
    """compute(), saved atomically at `path`; loaded instead when it is already there."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    result = compute()
    buf = io.BytesIO()
    torch.save(result, buf)
    atomic_write(path, buf.getvalue())
    return result


def pack_bits(right) -> str:
    """A row of booleans (which test examples a run got right) as "N:hex", 8 examples a byte: compact, diffable."""
    right = numpy.asarray(right.cpu() if hasattr(right, "cpu") else right, dtype=bool)  # a tensor on any device
    return f"{len(right)}:{numpy.packbits(right).tobytes().hex()}"


def unpack_bits(packed: str) -> numpy.ndarray:
    """pack_bits undone: N booleans."""
    n, hex_ = packed.split(":")
    return numpy.unpackbits(numpy.frombuffer(bytes.fromhex(hex_), dtype=numpy.uint8))[:int(n)].astype(bool)


def write_json(path: Path, payload: dict) -> None:
    atomic_write(path, (json.dumps(payload, indent=2) + "\n").encode())


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_vector_extensions() -> str:
    """The vector instruction sets this CPU has that change how torch's kernels round (AVX2, AVX-512, AMX...),
    and the one torch dispatches to: two CPUs of one vendor can differ here, and so can their numbers."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        have = sorted(f for f in flags.split(":", 1)[1].split() if f.startswith(("avx", "fma", "amx")))
    except (OSError, StopIteration):
        have = []
    return f"{' '.join(have) or 'unknown'}; torch dispatches {torch.backends.cpu.get_cpu_capability()}"


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "pandas": pd.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
            "cpu": cpu_name(), "cpu_vector_extensions": cpu_vector_extensions(),
            "cuda": torch.version.cuda if cuda else None,
            "cpu_threads": torch.get_num_threads(), "cpu_jobs_at_once": parallel.default_workers()}


def save_learning_rates(out: Outputs, tuning_fields: dict, grid: pd.DataFrame, chosen: dict[str, float],
                        seconds: float | None = None) -> None:
    """The search's grid and choice; `seconds`, the search's time, goes into the README block beside the sweep's."""
    atomic_write(out.lr_search, grid.to_csv(index=False).encode())
    timing = {} if seconds is None else {"search_seconds": round(seconds, 1)}
    write_json(out.learning_rates, {"config": tuning_fields, "chosen": chosen, **timing})


def load_learning_rates(out: Outputs, tuning_fields: dict, tune_command: str) -> dict[str, float]:
    """The chosen learning rates, refused when they were tuned for other `tuning_fields`."""
    path = out.learning_rates
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `{tune_command}` first")
    saved = json.loads(path.read_text())
    if saved["config"] != tuning_fields:
        diff = {k: (saved["config"].get(k), v) for k, v in tuning_fields.items() if saved["config"].get(k) != v}
        raise ValueError(f"{path} was tuned for another config (field: (saved, now)): {diff}; "
                         f"run `{tune_command}` with this config")
    return saved["chosen"]


def load_config(out: Outputs) -> dict:
    """The saved config with its environment and sweep time, and the search time saved with the learning rates:
    what an experiment's README block states."""
    config = json.loads(out.config.read_text())
    if out.learning_rates.is_file():
        config["search_seconds"] = json.loads(out.learning_rates.read_text()).get("search_seconds")
    return config


def save_results(out: Outputs, cfg, per_seed: pd.DataFrame, results: pd.DataFrame, fig, device: torch.device,
                 seconds: float, extra: dict | None = None) -> None:
    """The summary (6 significant digits), every run (full precision) with which test examples it got right in a
    file of its own (pack_bits), the config with the environment, the PNG."""
    atomic_write(out.summary, results.to_csv(index=False, float_format="%.6g").encode())
    atomic_write(out.per_seed, per_seed.drop(columns="test_correct").to_csv(index=False).encode())
    atomic_write(out.test_correct, per_seed[["method", "seed", "test_correct"]].to_csv(index=False).encode())
    write_json(out.config, {"config": dataclasses.asdict(cfg), "environment": environment(device),
                            "sweep_seconds": round(seconds, 1), **(extra or {})})
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(out.figure, buf.getvalue())


def with_int_columns(df: pd.DataFrame) -> pd.DataFrame:
    """rank, and alpha where every alpha is whole, as nullable ints: "4" in a CSV, never "4.0"."""
    whole = all(float(a).is_integer() for a in df["alpha"].dropna())
    return df.astype({"rank": "Int64", "alpha": "Int64" if whole else "Float64"})


def load_per_seed(out: Outputs) -> pd.DataFrame:
    """Every run as the sweep returned it, the test examples each got right included."""
    return with_int_columns(pd.read_csv(out.per_seed).merge(pd.read_csv(out.test_correct), on=["method", "seed"]))


def load_results(out: Outputs) -> pd.DataFrame:
    return with_int_columns(pd.read_csv(out.summary))
