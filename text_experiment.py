"""
The text experiment from the command line: MiniLM-L6 (all-MiniLM-L6-v2) adapted to drug-review sentiment by a
linear probe, by full finetuning and by LoRA, each at its learning rate chosen on validation, over several seeds.

    python text_experiment.py all --device cuda   # search + sweep -> results/text*.csv, .json, .png (a GPU job)
    python text_experiment.py readme              # the table of results/text.csv -> README.md
    python text_experiment.py has-gpu             # `make run`: exit 0 on a CUDA machine, else say why it skips
    python text_experiment.py all --quick --device cpu --out /tmp/t   # the tests' tiny config, in seconds

The committed results came from lora_text.ipynb, which runs the same steps (`make text`).
"""

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

import pandas as pd
import torch

import storage
import text_data
import text_report
import text_runs
from config import resolve_device
from text_config import TextConfig


def data_record(task: text_runs.TextTask) -> dict:
    """What the run read: review counts, the majority-class share of the test set, and every file's sha256."""
    y = {name: split[2] for name, split in task.splits.items()}
    return {"train": len(y["train"]), "val": len(y["val"]), "test": len(y["test"]),
            "majority": y["test"].float().mean().item(), "drug_reviews_sha256": text_data.DRUG_REVIEWS.members,
            "source_packages": [f"{s.package}=={s.version}" for s in (text_data.MINILM, text_data.DRUG_REVIEWS)]}


def save_outputs(cfg: TextConfig, task: text_runs.TextTask, out: storage.Outputs, grid: pd.DataFrame,
                 chosen: dict[str, float], per_seed: pd.DataFrame) -> pd.DataFrame:
    """Every file of the text experiment; returns the summary (results/text.csv).

    The times recorded are the training time of the runs themselves, summed, also when they were loaded from
    the cache: a resumed or re-executed run reports what the work cost, not how long loading took."""
    device = task.splits["train"][0].device
    storage.save_learning_rates(out, cfg.tuning_fields(), grid, chosen)
    results = text_report.summarize(per_seed, cfg)
    libraries = {name: importlib.metadata.version(name) for name in ("transformers", "tokenizers", "safetensors")}
    extra = {"tune_seconds": round(grid.seconds.sum(), 1), "weights": task.weights, "data": data_record(task),
             "libraries": libraries, "dtype": "float32 weights and Adam state" + (
                 ", bf16 autocast" if cfg.amp and device.type == "cuda" else "")}
    fig = text_report.plot(results, extra["data"]["majority"])
    storage.save_results(out, cfg, per_seed, results, fig, device, per_seed.seconds.sum(), extra)
    return results


def run_all(cfg: TextConfig, device: torch.device, out: storage.Outputs,
            cache_dir: Path = text_runs.CACHE) -> pd.DataFrame:
    """Learning-rate search, sweep and every file, as lora_text.ipynb does cell by cell. Returns the summary."""
    task = text_runs.load_task(cfg, device)
    grid, chosen = text_runs.tune(cfg, task, cache_dir)
    per_seed = text_runs.run_sweep(cfg, task, chosen, cache_dir)
    return save_outputs(cfg, task, out, grid, chosen, per_seed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["all", "readme", "has-gpu"])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true", help="the tiny config of the tests")
    p.add_argument("--out", type=Path, default=storage.ROOT, help="where results go (default: the repo)")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    cfg, out = TextConfig.quick() if args.quick else TextConfig(), storage.Outputs("text", args.out)
    if args.command == "has-gpu":
        if torch.cuda.is_available():
            return
        committed = json.loads(out.config.read_text()) if out.config.is_file() else None
        took = "" if committed is None else (
            f" (the committed run took {committed['tune_seconds'] + committed['sweep_seconds']:.0f} s "
            f"on {committed['environment']['device_name']})")
        print(f"text experiment skipped: it needs a CUDA GPU{took}; {out.summary.parent}/text* left as they are. "
              "On a machine with one: make text")
        sys.exit(1)
    if args.command == "all":
        print(run_all(cfg, device, out).to_string(index=False))
    else:
        text_report.update_readme(storage.ROOT / "README.md", out)


if __name__ == "__main__":
    main()
