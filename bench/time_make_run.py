"""How long `make run` takes, with its conditions, written to results/run_times.json, which the README's time line
is generated from (`make run` itself never writes that file, so a re-run leaves it as it was).

    python bench/time_make_run.py            # rm -rf runs, then make run: from an empty run cache
    python bench/time_make_run.py --warm     # make run as it is: finished runs load from runs/

The virtual environment must be installed already (its set-up, mostly downloading torch, is not timed).
"""

import argparse
import datetime
import os
import shutil
import subprocess
import time

from common import ROOT, record_run_time  # first: puts the repo on sys.path
from experiments import storage


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--warm", action="store_true", help="keep runs/: time a re-run that loads finished runs")
    args = p.parse_args()
    if not (ROOT / ".venv" / "installed").is_file():
        raise SystemExit("install the virtual environment first (make data): its download is not what this times")
    if not args.warm:
        shutil.rmtree(ROOT / "runs", ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(["make", "run"], cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    cores = os.cpu_count()
    record_run_time("make run" + (" (warm)" if args.warm else ""), {
        "what": "`make run`" + (", a re-run" if args.warm else ""), "seconds": round(seconds, 1),
        "machine": f"{storage.cpu_name()}, {cores} cores",
        "conditions": ("virtual environment installed, run cache as the previous run left it" if args.warm
                       else "virtual environment installed, run cache empty") + ", nothing else running",
        "date": datetime.date.today().isoformat()})
    subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "experiments", "readme", "--experiment", "mlp"],
                   cwd=ROOT, check=True)  # the README's time line, from the file just written
    print(f"make run: {seconds:.0f} s")


if __name__ == "__main__":
    main()
