"""Does a learning rate diverge on the reported seeds? Evidence for the selection rule (protocol.choose): train some
methods of an experiment at one rate on its reported seeds and count the runs whose training loss ended at chance
level. Only training losses and validation accuracies are printed: a rule must not be chosen on test numbers.

    python bench/divergence_check.py --experiment transformer --lr 0.03 --methods lora_qkvo_r4 lora_all_r8

Runs go to the usual run cache (runs/), keyed as the sweep's, so a method swept at that rate later loads them.
"""

import argparse
from pathlib import Path

import torch

from common import ROOT, record, table  # first: puts the repo on sys.path
from experiments import protocol
from experiments.mnist.config import Config
from experiments.mnist.experiment import MnistExperiment


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", choices=["mlp", "transformer"], default="transformer")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--methods", nargs="+", required=True)
    args = p.parse_args()
    exp = MnistExperiment(Config.default(args.experiment), torch.device("cpu"))
    methods = {m.name: m for m in exp.methods}
    unknown = sorted(set(args.methods) - set(methods))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}: choose from {sorted(methods)}")
    jobs = [(methods[name], (args.lr,)) for name in args.methods]
    seeds = list(range(exp.cfg.seeds))
    rows = []
    for (method, _), records in zip(jobs, protocol.run_jobs(exp, seeds, jobs, ROOT / "runs", False, "check")):
        diverged = [bool(protocol.rose(r["loss_first_epoch"], r["loss_last_epoch"])) for r in records]
        rows.append([method.name, ", ".join(f"{r['loss_last_epoch']:.3f}" for r in records),
                     ", ".join(f"{r['val_acc_B']:.4f}" for r in records), f"{sum(diverged)} of {len(records)}"])
    body = table(["method", "last-epoch training loss per seed", "validation accuracy per seed", "diverged"], rows)
    body += (f"\n\nAt lr {args.lr:g}, the reported seeds {seeds[0]}-{seeds[-1]}; diverged: the training loss not "
             "finite, or its last epoch's mean above its first's (protocol.rose). No test number is read.")
    record(f"The selection rule: {args.experiment} at lr {args.lr:g} on the reported seeds", body, exp.device)


if __name__ == "__main__":
    main()
