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
RUN_TIMES = ROOT / "results" / "run_times.json"  # timed runs, with machine and conditions: bench/time_make_run.py


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
    def runner_up(self) -> Path:
        """The summary rows of the methods whose runner-up rate was swept too, at that rate."""
        return self._file("_runner_up.csv")

    @property
    def lr_search(self) -> Path:
        return self._file("_lr_search.csv")

    @property
    def learning_rates(self) -> Path:
        return self._file("_learning_rates.json")

    @property
    def times(self) -> Path:
        """How long this machine's last search and sweep took: beside the run cache, not among the results, so a
        re-run that reproduces the results leaves every committed file as it was."""
        return Path(self.root) / "runs" / "times.json"

    def all(self) -> list[Path]:
        return [self.summary, self.per_seed, self.test_correct, self.config, self.figure, self.lr_search,
                self.learning_rates, self.runner_up]


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


def record_time(out: Outputs, phase: str, seconds: float | None) -> None:
    """Keep `seconds` for `phase` ("search", "sweep") of this experiment in out.times (runs/times.json)."""
    if seconds is None:
        return
    times = json.loads(out.times.read_text()) if out.times.is_file() else {}
    times.setdefault(out.experiment, {})[phase] = round(seconds, 1)
    write_json(out.times, times)


def load_times(out: Outputs) -> dict[str, float]:
    """{"search": s, "sweep": s} of this experiment's last run on this machine, where recorded."""
    return json.loads(out.times.read_text()).get(out.experiment, {}) if out.times.is_file() else {}


def save_learning_rates(out: Outputs, tuning_fields: dict, grid: pd.DataFrame, chosen: dict[str, float],
                        seconds: float | None = None, runner_up: dict[str, float] | None = None) -> None:
    """The search's grid, choice and the runner-up rates swept too; `seconds`, the search's time, goes to
    out.times."""
    atomic_write(out.lr_search, grid.to_csv(index=False).encode())
    write_json(out.learning_rates, {"config": tuning_fields, "chosen": chosen, "runner_up": runner_up or {}})
    record_time(out, "search", seconds)


def load_learning_rates(out: Outputs, tuning_fields: dict, tune_command: str, with_runner_up: bool = False):
    """The chosen learning rates (and, with_runner_up, also the runner-up rates: a pair of dicts), refused when
    they were tuned for other `tuning_fields`."""
    path = out.learning_rates
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `{tune_command}` first")
    saved = json.loads(path.read_text())
    if saved["config"] != tuning_fields:
        diff = {k: (saved["config"].get(k), v) for k, v in tuning_fields.items() if saved["config"].get(k) != v}
        raise ValueError(f"{path} was tuned for another config (field: (saved, now)): {diff}; "
                         f"run `{tune_command}` with this config")
    return (saved["chosen"], saved.get("runner_up", {})) if with_runner_up else saved["chosen"]


def load_config(out: Outputs) -> dict:
    """The saved config with its environment: what an experiment's README block states."""
    return json.loads(out.config.read_text())


def save_results(out: Outputs, cfg, per_seed: pd.DataFrame, results: pd.DataFrame, fig, device: torch.device,
                 seconds: float, extra: dict | None = None, runner_up: pd.DataFrame | None = None) -> None:
    """The summary (6 significant digits) and its runner-up rows, every run (full precision) with which test
    examples it got right in a file of its own (pack_bits), the config with the environment, the PNG; the sweep's
    `seconds` to out.times."""
    save_summary(out, results, fig, runner_up)
    atomic_write(out.per_seed, per_seed.drop(columns="test_correct").to_csv(index=False).encode())
    keys = ["method", "seed"] + (["runner_up"] if "runner_up" in per_seed else [])
    atomic_write(out.test_correct, per_seed[keys + ["test_correct"]].to_csv(index=False).encode())
    write_json(out.config, {"config": dataclasses.asdict(cfg), "environment": environment(device), **(extra or {})})
    record_time(out, "sweep", seconds)


def save_summary(out: Outputs, results: pd.DataFrame, fig, runner_up: pd.DataFrame | None = None) -> None:
    """What reporting writes: the summary (6 significant digits), its runner-up rows (a header alone where there
    are none) and the PNG."""
    atomic_write(out.summary, results.to_csv(index=False, float_format="%.6g").encode())
    runner_up = results.iloc[:0] if runner_up is None or runner_up.empty else runner_up
    atomic_write(out.runner_up, runner_up.to_csv(index=False, float_format="%.6g").encode())
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(out.figure, buf.getvalue())


def with_int_columns(df: pd.DataFrame) -> pd.DataFrame:
    """rank, and alpha where every alpha is whole, as nullable ints: "4" in a CSV, never "4.0"."""
    whole = all(float(a).is_integer() for a in df["alpha"].dropna())
    return df.astype({"rank": "Int64", "alpha": "Int64" if whole else "Float64"})


def load_per_seed(out: Outputs) -> pd.DataFrame:
    """Every run as the sweep returned it, the test examples each got right included."""
    per_seed = pd.read_csv(out.per_seed)
    keys = ["method", "seed"] + (["runner_up"] if "runner_up" in per_seed else [])
    return with_int_columns(per_seed.merge(pd.read_csv(out.test_correct), on=keys))


def load_results(out: Outputs, runner_up: bool = False) -> pd.DataFrame:
    """The summary as summarize returned it (or, runner_up, its runner-up rows: empty where there is no such
    file): ranks as ints, a missing verdict as "" (a CSV reads it back as NaN)."""
    path = out.runner_up if runner_up else out.summary
    if runner_up and not path.is_file():
        return pd.DataFrame()
    df = pd.read_csv(path)
    if df.empty:
        return df
    df = with_int_columns(df)
    verdicts = [c for c in df.columns if c.startswith("verdict_")]  # and rate_sensitive_* read back as bools
    return df.assign(**{c: df[c].astype(object).fillna("") for c in verdicts})
