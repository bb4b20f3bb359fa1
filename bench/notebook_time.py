"""A notebook end to end, as a learner runs it: wall time from a fresh kernel with an empty run cache, and the
search and sweep times it records, the median of several runs.

    python bench/notebook_time.py [lora_from_scratch.ipynb] [--repeats 3] [--device auto|cpu|cuda]

Runs a copy of the notebook, writing its results under a temporary folder (LORA_OUT_DIR), through `jupyter
nbconvert --execute` where Jupyter is installed, else through bench/run_notebook.py (the GPU machine's image has
no kernel). The committed notebook and results are not touched.
"""

import argparse
import datetime
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, machine, median, record, record_run_time, table  # first: puts the repo on sys.path
from experiments import storage
from experiments.methods import resolve_device

RECORDED = {"lora_from_scratch.ipynb": "mlp", "lora_transformer.ipynb": "transformer"}


def run_once(notebook: Path, device: torch.device) -> tuple[float, float, float]:
    """(wall seconds, search seconds, sweep seconds) of one run from a fresh kernel, in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / notebook.name
        shutil.copy(notebook, copy)
        env = {**os.environ, "LORA_OUT_DIR": tmp, "LORA_NO_PROGRESS": "1", "LORA_DEVICE": str(device),
               "PYTHONPATH": str(ROOT)}
        if importlib.util.find_spec("nbconvert") is not None:
            command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                       "--ExecutePreprocessor.timeout=3600", str(copy)]
        else:
            command = [sys.executable, str(ROOT / "bench" / "run_notebook.py"), str(copy)]
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, cwd=ROOT, capture_output=True)
        wall = time.perf_counter() - start
        times = storage.load_times(storage.Outputs(RECORDED[notebook.name], Path(tmp)))
    return wall, times["search"], times["sweep"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("notebook", nargs="?", default="lora_from_scratch.ipynb", choices=sorted(RECORDED))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    runs = []
    for _ in range(args.repeats):
        runs.append(run_once(ROOT / args.notebook, device))
        print("wall %.1f s, search %.1f s, sweep %.1f s" % runs[-1])
    cols = list(zip(*runs))
    body = table(["", "runs (s)", "median (s)"],
                 [[what, ", ".join(f"{t:.1f}" for t in ts), f"**{median(ts):.1f}**"]
                  for what, ts in zip(("end to end, fresh kernel", "search (as it prints)", "sweep (as it prints)"),
                                      cols)])
    body += "\n\nEach run from an empty run cache, on " + str(device) + "; search and sweep are the times the " \
            "notebook itself records (runs/times.json)."
    record(f"5. The notebook {args.notebook}, end to end", body, device)
    record_run_time(f"{args.notebook} on {device.type}", {
        "what": f"`{args.notebook}` alone", "seconds": round(median(cols[0]), 1),
        "machine": machine(device).rsplit(", torch", 1)[0],
        "conditions": f"fresh kernel, run cache empty, median of {args.repeats}",
        "date": datetime.date.today().isoformat()})


if __name__ == "__main__":
    main()
