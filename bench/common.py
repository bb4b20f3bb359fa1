"""What every bench script shares: the machine's name, timing helpers, and appending a result to RESULTS.md."""

import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import protocol, storage  # noqa: E402
from experiments.mnist.config import Config  # noqa: E402
from experiments.mnist.experiment import MnistExperiment  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{storage.cpu_name()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"


def wall(fn, device: torch.device) -> float:
    """Seconds for fn(), with the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def default_learning_rates(cfg: Config) -> dict[str, float]:
    """The committed learning rates of the default experiment of cfg.model."""
    command = MnistExperiment(cfg, torch.device("cpu")).tune_command()
    return storage.load_learning_rates(storage.Outputs(cfg.model), protocol.tuning_fields(cfg), command)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def record_run_time(key: str, entry: dict) -> None:
    """Add or replace one timed run (what, seconds, machine, conditions, date) in results/run_times.json, from
    which the README's time line is generated."""
    times = json.loads(storage.RUN_TIMES.read_text()) if storage.RUN_TIMES.is_file() else {}
    times[key] = entry
    storage.write_json(storage.RUN_TIMES, times)


def record(title: str, body: str, device: torch.device) -> None:
    """Print `body` and append it to bench/RESULTS.md with the command, the machine and the date."""
    command = "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute()
                                    else sys.argv[0], *sys.argv[1:]])
    entry = (f"\n### {title}\n\n`{command}` on {machine(device)}, "
             f"{datetime.date.today().isoformat()}\n\n{body}\n")
    print(entry)
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nAppended by the scripts in bench/.\n"
    storage.atomic_write(RESULTS, (old + entry).encode())
