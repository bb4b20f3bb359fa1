"""The budget curves: validation and test accuracy against optimizer steps for the linear probe, full finetuning,
LoRA on Wq, Wv at the lowest rank and at wide_rank and on every nn.Linear, each at the rate its own budget chose,
mean ± std over the reported seeds as bands, from the committed records alone. The chosen epoch is marked on the
validation panel; the test panel is for reading only: nothing is chosen from it."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..storage import Outputs, unpack_bits
from . import records, table
from .config import TextConfig

COLORS = {"head": "tab:red", "full": "black"}
LORA_COLORS = ("tab:blue", "tab:orange", "tab:green")


def path(root: Path, task: str) -> Path:
    return Path(root) / "results" / f"text_{task}_curves.png"


def points(root: Path, task: str) -> pd.DataFrame:
    """One row per curve method and epoch: steps, validation and test accuracy (mean, std over seeds), whether the
    own budget chose that epoch. Choices from the search alone (records.choices)."""
    config = json.loads(Outputs(f"text_{task}", root).config.read_text())
    cfg = config["config"]
    search, runs = records.read(root, task)
    own = records.choices(search, 2, cfg["epochs"], cfg["val_size"])["own"]
    wanted = [m.name for m in TextConfig(**{k: tuple(v) if isinstance(v, list) else v
                                             for k, v in cfg.items()}).curve_methods]
    rows = []
    for method in wanted:
        lr, chosen = own[method]
        at = runs[(runs["method"] == method) & records.np_isclose(runs["lr"], lr)]
        for epoch, g in at.groupby("epoch"):
            val = g["val_bits"].map(lambda b: unpack_bits(b).mean())
            test = g["test_bits"].map(lambda b: unpack_bits(b).mean())
            rows.append({"method": method, "lr": lr, "epoch": epoch, "steps": epoch * config["steps_per_epoch"],
                         "val_mean": val.mean(), "val_std": val.std(), "test_mean": test.mean(),
                         "test_std": test.std(), "chosen": epoch == chosen})
    return pd.DataFrame(rows)


def plot(root: Path, task: str) -> Figure:
    config = json.loads(Outputs(f"text_{task}", root).config.read_text())
    labels = {m["name"]: records.label({"method": m["name"], "rank": m["rank"], "targets": m["targets"],
                                        "nf4": m["nf4"]}) for m in config["methods"]}
    pts = points(root, task)
    fig = Figure(figsize=(12, 4.8), dpi=120)
    axes = fig.subplots(1, 2, sharey=True)
    lora_colors = iter(LORA_COLORS)
    colors = {m: COLORS.get(m) or next(lora_colors) for m in pts["method"].unique()}
    for ax, split in zip(axes, ("val", "test")):
        for method, g in pts.groupby("method", sort=False):
            mean, std = g[f"{split}_mean"].to_numpy(), np.nan_to_num(g[f"{split}_std"].to_numpy())
            ax.plot(g["steps"], mean, "o-", color=colors[method], ms=3,
                    label=f"{labels[method]} (lr {g['lr'].iloc[0]:g})")
            ax.fill_between(g["steps"], mean - std, mean + std, color=colors[method], alpha=0.15, lw=0)
            if split == "val":
                c = g[g["chosen"]]
                ax.plot(c["steps"], c["val_mean"], "*", color=colors[method], ms=13, mec="white")
        ax.set_xlabel("optimizer steps (batch size %d)" % config["config"]["batch_size"])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy, mean ± std over seeds")
    axes[0].set_title("validation (★: the epoch each method's own budget chose)", fontsize=10)
    axes[1].set_title("test, for reading only: nothing is chosen from it", fontsize=10)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"MiniLM-L6 on {table.TASK_LABELS[task]}: accuracy against the budget, "
                 f"one run per seed read after every epoch (warmup, then linear decay over {config['config']['epochs']} "
                 "epochs)", fontsize=10)
    fig.tight_layout()
    return fig
