"""How a text run plugs into the protocol: one (method, learning rate, seed) training of MiniLM on drug-review
sentiment with the plain loop (bf16 autocast on CUDA, batches trimmed to their longest review), scored on the
validation and test reviews. The run cache's key includes the sha256 of the weights the runs start from."""

import copy
import functools
import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import lora

from .. import figures, report
from ..methods import Method
from ..plain_loop import plain_fit
from ..protocol import Experiment
from ..storage import DATA_DIR, ROOT, Outputs
from ..trainer import set_seed
from . import data
from .config import TextConfig
from .model import TARGET_SETS, SentimentClassifier, load_encoder, load_tokenizer, tokenize

PACKAGE = Path(__file__).resolve().parents[1]
Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids (N, L), attention_mask (N, L), labels (N,)


@dataclass
class TextSetup:
    """What every text run reads: the tokenized reviews on the device, the pretrained encoder, its provenance."""
    splits: dict[str, Split]      # "train", "val", "test"
    encoder: torch.nn.Module      # pretrained, float32, never trained itself: every run starts from a copy
    weights: dict                 # data.find_minilm's provenance: which file, its sha256
    texts: dict[str, list[str]]   # the cleaned reviews of each split, for showing


def load_setup(cfg: TextConfig, device: torch.device, data_root: Path = DATA_DIR) -> TextSetup:
    """Reviews split into train / val (stratified, split_seed) / test, tokenized once to cfg.max_len."""
    reviews = data.load_drug_reviews(data.prepare_drug_reviews(Path(data_root) / "drugreview"))
    folder, weights = data.find_minilm(data_root)
    tokenizer = load_tokenizer(folder)
    texts, labels = reviews["train"]
    train_idx, val_idx = data.split_train_val(len(texts), cfg.val_fraction, cfg.split_seed, labels)
    if cfg.train_subset is not None:
        train_idx, val_idx = train_idx[:cfg.train_subset], val_idx[:cfg.train_subset]
    test_texts, test_labels = reviews["test"]
    test_idx = np.arange(len(test_texts) if cfg.test_subset is None else min(cfg.test_subset, len(test_texts)))
    parts = {"train": (texts, labels, train_idx), "val": (texts, labels, val_idx),
             "test": (test_texts, test_labels, test_idx)}
    splits, shown = {}, {}
    for name, (x, y, idx) in parts.items():
        shown[name] = [x[i] for i in idx]
        ids, mask = tokenize(tokenizer, shown[name], cfg.max_len, pad_to_max_len=True)  # (N, max_len) each
        splits[name] = (ids.to(device), mask.to(device), torch.tensor([y[i] for i in idx], device=device))
    return TextSetup(splits, load_encoder(folder).to(device), weights, shown)


def build_model(setup: TextSetup, method: Method) -> SentimentClassifier:
    """A fresh classifier on a copy of the pretrained encoder, with only what `method` trains left trainable.
    The head is drawn first and LoRA's A after it, from the seed set by the caller."""
    model = SentimentClassifier(copy.deepcopy(setup.encoder), probe=method.kind == "head")
    model.head.to(next(setup.encoder.parameters()).device)
    if method.kind == "head":
        model.encoder.requires_grad_(False)
    elif method.kind == "lora":
        lora.add_lora(model, r=method.rank, targets=TARGET_SETS[method.target_set])
        lora.mark_only_lora_as_trainable(model)
        model.head.requires_grad_(True)  # a new task's head trains in full, as in the paper
    return model


def trim(x: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reviews `idx` as (ids, mask), trimmed to the longest of them: padding is never computed."""
    ids, mask = x
    length = int(mask[idx].sum(1).max())
    return ids[idx, :length], mask[idx, :length]


def batches(split: Split, batch_size: int):
    """(ids, mask, y) per batch in order, each trimmed to its longest review."""
    ids, mask, y = split
    for i in range(0, len(y), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(y)), device=y.device)
        yield *trim((ids, mask), idx), y[idx]


def amp_dtype(cfg: TextConfig, device: torch.device) -> torch.dtype | None:
    """bf16 matmuls on CUDA when cfg.amp; float32 everywhere else. Weights and Adam's state stay float32."""
    return torch.bfloat16 if cfg.amp and device.type == "cuda" else None


@torch.no_grad()
def evaluate(model: SentimentClassifier, split: Split, cfg: TextConfig, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode."""
    model.eval()
    correct, loss = 0, 0.0
    dtype = amp_dtype(cfg, device)
    for ids, mask, y in batches(split, 64):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(ids, mask).float()  # (B, 2)
        correct += (logits.argmax(-1) == y).sum().item()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
    n = len(split[2])
    return correct / n, loss / n


def train_run(cfg: TextConfig, setup: TextSetup, method: Method, lr: float, seed: int) -> dict:
    """Train one model with the plain loop (Adam, cosine schedule) for cfg.epochs; score it on validation and test.

    The seed fixes the head's initialisation, LoRA's A and the data order, so every method of one seed starts
    from the same head and sees the same batches; the dropout stream is the method's own."""
    start = time.perf_counter()
    ids, mask, y = setup.splits["train"]
    set_seed(seed)
    model = build_model(setup, method)
    set_seed(seed + method.dropout_seed)
    steps = plain_fit(model, (ids, mask), y, seed, lr, cfg.epochs, cfg.batch_size, select=trim,
                      amp_dtype=amp_dtype(cfg, y.device), fused=True)
    per_epoch = len(steps) // cfg.epochs
    losses = [sum(steps[e * per_epoch:(e + 1) * per_epoch]) / per_epoch for e in range(cfg.epochs)]
    (val_acc, val_loss), (test_acc, test_loss) = (evaluate(model, setup.splits[s], cfg, y.device)
                                                  for s in ("val", "test"))
    alphas = {layer.alpha for _, layer in lora.lora_layers(model)}  # as the layers have it
    return {"method": method.name, "kind": method.kind, "rank": method.rank,
            "targets": method.target_set if method.kind == "lora" else None,
            "alpha": alphas.pop() if len(alphas) == 1 else None, "lr": lr, "seed": seed,
            "trainable_params": lora.count_parameters(model)[0], "val_acc": val_acc, "val_loss": val_loss,
            "test_acc": test_acc, "test_loss": test_loss, "seconds": time.perf_counter() - start,
            "loss_first_epoch": losses[0], "loss_last_epoch": losses[-1]}


class TextExperiment(Experiment):
    """MiniLM-L6 on drug-review sentiment: linear probe, full finetuning, LoRA on three target sets."""
    name, metric, val_metric = "text", "test_acc", "val_acc"
    per_seed_columns = ("method", "kind", "rank", "targets", "alpha", "lr", "seed", "trainable_params", "val_acc",
                        "val_loss", "test_acc", "test_loss", "seconds", "loss_first_epoch", "loss_last_epoch")
    cache = ROOT / "runs" / "text"

    def __init__(self, cfg: TextConfig, device: torch.device, data_root: Path = DATA_DIR):
        super().__init__(cfg, device)
        self.setup = functools.cache(lambda: load_setup(cfg, device, data_root))
        self.weights = functools.cache(lambda: data.find_minilm(data_root)[1])

    def code_files(self) -> list[Path]:
        return ([ROOT / "lora.py"] + [PACKAGE / f for f in ("methods.py", "plain_loop.py", "protocol.py")]
                + [PACKAGE / "text" / f for f in ("config.py", "data.py", "model.py", "experiment.py")])

    def key_extra(self) -> list:
        return [self.weights()["sha256"]]

    def train(self, shared, method: Method, lrs: tuple[float, ...], seeds: list[int]) -> list[dict]:
        return [train_run(self.cfg, self.setup(), method, lr, s) for lr in lrs for s in seeds]

    def summarize(self, per_seed: pd.DataFrame) -> pd.DataFrame:
        cfg = self.cfg
        return report.summarize(per_seed, self.methods, self.metric,
                                budget={"epochs": cfg.epochs, "batch_size": cfg.batch_size, "max_len": cfg.max_len})

    def table(self, results: pd.DataFrame) -> pd.DataFrame:
        return report.table(results)

    def plot(self, results: pd.DataFrame, majority: float | None = None):
        """The figure, with the majority class's accuracy as a dotted line (default: this setup's test split)."""
        majority = data_record(self.setup())["majority"] if majority is None else majority
        by = results.set_index("method").loc["full"]

        def majority_line(ax):
            ax.axhline(majority, color="tab:gray", ls=":", lw=1.2,
                       label=f"always 'positive' (majority class), {majority:.3f}")
        return figures.plot(results, f"MiniLM-L6 on drug-review sentiment: LoRA against full finetuning, every "
                                     f"method {int(by.epochs)} epochs at batch size {int(by.batch_size)}",
                            "test accuracy, positive vs negative review", majority_line)

    def config_extra(self, out: Outputs, per_seed: pd.DataFrame) -> dict:
        """What the text config JSON records besides the config: the runs' training time summed (also where
        they were loaded from the cache: what the work cost, not how long loading took), the weights, the data
        and the library versions."""
        setup = self.setup()
        libraries = {name: importlib.metadata.version(name) for name in ("transformers", "tokenizers", "safetensors")}
        amp = amp_dtype(self.cfg, self.device) is not None
        return {"sweep_seconds": round(per_seed.seconds.sum(), 1),
                "tune_seconds": round(pd.read_csv(out.lr_search).seconds.sum(), 1), "weights": setup.weights,
                "data": data_record(setup), "libraries": libraries,
                "dtype": "float32 weights and Adam state" + (", bf16 autocast" if amp else "")}

    def readme_block(self, results: pd.DataFrame, config: dict) -> str:
        c, env, d = config["config"], config["environment"], config["data"]
        amp = ", bf16 autocast" if c["amp"] and env["device"].startswith("cuda") else ""
        return report.markdown(self.table(results)) + (
            f"\n\n{c['seeds']} seeds; {d['train']} training, {d['val']} validation and {d['test']} test "
            f"reviews ({100 * d['majority']:.1f}% of the test reviews are positive); every method "
            f"{c['epochs']} epoch{'s' * (c['epochs'] > 1)} at batch size {c['batch_size']}, at most {c['max_len']} "
            f"tokens, Adam with a cosine schedule{amp}. Weights: {config['weights']['weights']}. The runs' training "
            f"time, summed (cached runs included): {config['tune_seconds']:.0f} s for the learning-rate search and "
            f"{config['sweep_seconds']:.0f} s for the sweep on {env['device_name']}, torch {env['torch']}.")

    def skip_without_gpu(self, out: Outputs) -> str | None:
        """None on a CUDA machine; elsewhere why `make run` keeps the committed text results."""
        if torch.cuda.is_available():
            return None
        committed = json.loads(out.config.read_text()) if out.config.is_file() else None
        took = "" if committed is None else (
            f" (the committed run took {committed['tune_seconds'] + committed['sweep_seconds']:.0f} s "
            f"on {committed['environment']['device_name']})")
        return (f"text experiment skipped: it needs a CUDA GPU{took}; {out.summary.parent}/text* left as they are. "
                "On a machine with one: make text")


def data_record(setup: TextSetup) -> dict:
    """What the runs read: review counts, the majority-class share of the test set, and every file's sha256."""
    y = {name: split[2] for name, split in setup.splits.items()}
    return {"train": len(y["train"]), "val": len(y["val"]), "test": len(y["test"]),
            "majority": y["test"].float().mean().item(), "drug_reviews_sha256": data.DRUG_REVIEWS.members,
            "source_packages": [f"{s.package}=={s.version}" for s in (data.MINILM, data.DRUG_REVIEWS)]}


def discussion(results: pd.DataFrame, majority: float) -> str:
    """The notebook's discussion, sentence by sentence from the numbers."""
    full = results.set_index("method").loc["full"]
    lines = [f"Always answering 'positive' scores {majority:.3f} on the test reviews.", report.verdict_lines(results)]
    qv = results[results.targets == "qv"]
    level = qv[qv.diff_vs_full_high >= 0]
    if len(level):
        r = level.iloc[0]
        lines.append(f"The smallest rank of LoRA on Wq, Wv not below full finetuning is r={r['rank']}, with "
                     f"{100 * r.trainable_params / full.trainable_params:.2f}% of its trainable parameters.")
    else:
        lines.append("At every rank, LoRA on Wq, Wv stays below full finetuning.")
    return "\n".join(lines)
