"""Runs of the text experiment: one (method, learning rate, seed) training of MiniLM on drug-review sentiment,
the learning-rate search on validation, and the sweep. Each finished run is cached on disk, keyed by the config,
the device type, the code that can change its numbers and the weights it started from."""

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import lora
import text_data
from config import Method
from storage import cached, fingerprint, with_int_columns
from text_config import TextConfig
from text_model import TARGET_SETS, SentimentClassifier, load_encoder, load_tokenizer, tokenize
from trainer import set_seed

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "runs" / "text"
TRAINING_CODE = ("lora.py", "config.py", "text_config.py", "text_data.py", "text_model.py", "text_runs.py")

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids (N, L), attention_mask (N, L), labels (N,)


@dataclass
class TextTask:
    """The tokenized reviews on the device, the pretrained encoder, and where its weights came from."""
    splits: dict[str, Split]      # "train", "val", "test"
    encoder: torch.nn.Module      # pretrained, float32, never trained itself: every run starts from a copy
    weights: dict                 # text_data.find_minilm's provenance: which file, its sha256
    texts: dict[str, list[str]]   # the cleaned reviews of each split, for showing


def load_task(cfg: TextConfig, device: torch.device, data_root: Path = text_data.DATA_DIR) -> TextTask:
    """Reviews split into train / val (stratified, split_seed) / test, tokenized once to cfg.max_len."""
    reviews = text_data.load_drug_reviews(text_data.prepare_drug_reviews(Path(data_root) / "drugreview"))
    folder, weights = text_data.find_minilm(data_root)
    tokenizer = load_tokenizer(folder)
    texts, labels = reviews["train"]
    train_idx, val_idx = text_data.split_train_val(len(texts), cfg.val_fraction, cfg.split_seed, labels)
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
    return TextTask(splits, load_encoder(folder).to(device), weights, shown)


def build_model(task: TextTask, method: Method) -> SentimentClassifier:
    """A fresh classifier on a copy of the pretrained encoder, with only what `method` trains left trainable.
    The head is drawn first and LoRA's A after it, from the seed set by the caller."""
    model = SentimentClassifier(copy.deepcopy(task.encoder))
    model.head.to(next(task.encoder.parameters()).device)
    if method.kind == "head":
        model.encoder.requires_grad_(False)
    elif method.kind == "lora":
        lora.add_lora(model, r=method.rank, targets=TARGET_SETS[method.targets])
        lora.mark_only_lora_as_trainable(model)
        model.head.requires_grad_(True)  # a new task's head trains in full, as in the paper
    return model


def batches(split: Split, batch_size: int, order: torch.Tensor | None = None, drop_last: bool = False):
    """(ids, mask, y) per batch, trimmed to the longest review in the batch: padding is never computed."""
    ids, mask, y = split
    n = len(y)
    order = torch.arange(n, device=y.device) if order is None else order.to(y.device)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        length = int(mask[idx].sum(1).max())
        yield ids[idx, :length], mask[idx, :length], y[idx]


def autocast(cfg: TextConfig, device: torch.device):
    """bf16 matmuls on CUDA when cfg.amp; float32 everywhere else. Weights and Adam's state stay float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")


@torch.no_grad()
def evaluate(model: SentimentClassifier, split: Split, cfg: TextConfig, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode."""
    model.eval()
    correct, loss = 0, 0.0
    for ids, mask, y in batches(split, 64):
        with autocast(cfg, device):
            logits = model(ids, mask).float()  # (B, 2)
        correct += (logits.argmax(-1) == y).sum().item()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
    n = len(split[2])
    return correct / n, loss / n


def train_run(cfg: TextConfig, task: TextTask, method: Method, lr: float, seed: int) -> dict:
    """Train one model with Adam and a cosine schedule for cfg.epochs; score it on validation and test.

    The seed fixes the head's initialisation, LoRA's A and the data order, so every method of one seed starts
    from the same head and sees the same batches; the dropout stream is the method's own."""
    start = time.perf_counter()
    device = task.splits["train"][0].device
    set_seed(seed)
    model = build_model(task, method)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n = len(task.splits["train"][2])
    steps = cfg.epochs * (n // cfg.batch_size)
    opt = torch.optim.Adam(trainable, lr=lr, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    order_gen = torch.Generator().manual_seed(seed)
    set_seed(seed + method.dropout_seed)
    losses = []
    for _ in range(cfg.epochs):
        model.train()
        if method.kind == "head":
            model.encoder.eval()  # a linear probe reads the frozen encoder's features, without dropout
        total = torch.zeros((), device=device)
        for ids, mask, y in batches(task.splits["train"], cfg.batch_size, torch.randperm(n, generator=order_gen),
                                    drop_last=True):
            with autocast(cfg, device):
                logits = model(ids, mask).float()  # (B, L) -> (B, 2)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.detach()
        losses.append(total.item() / (n // cfg.batch_size))
    (val_acc, val_loss), (test_acc, test_loss) = (evaluate(model, task.splits[s], cfg, device) for s in ("val", "test"))
    alphas = {layer.alpha for _, layer in lora.lora_layers(model)}  # as the layers have it
    return {"method": method.name, "kind": method.kind, "rank": method.rank,
            "targets": method.targets if method.kind == "lora" else None,
            "alpha": alphas.pop() if len(alphas) == 1 else None, "lr": lr, "seed": seed,
            "trainable_params": lora.count_parameters(model)[0], "losses": losses,
            "val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc, "test_loss": test_loss,
            "seconds": time.perf_counter() - start}


def run_key(cfg: TextConfig, device: torch.device, weights: dict) -> str:
    """The config, the device type, the code that can change a trained number, and the weights' sha256."""
    return fingerprint([asdict(cfg), device.type, weights["sha256"]], [ROOT / f for f in TRAINING_CODE])


def _runs(cfg: TextConfig, task: TextTask, jobs: list[tuple[Method, float, int]], cache_dir: Path) -> list[dict]:
    device = task.splits["train"][0].device
    folder = Path(cache_dir) / run_key(cfg, device, task.weights)
    return [cached(folder / f"{m.name}_lr{lr:g}_seed{seed}.pt", lambda: train_run(cfg, task, m, lr, seed))
            for m, lr, seed in jobs]


def tune(cfg: TextConfig, task: TextTask, cache_dir: Path = CACHE) -> tuple[pd.DataFrame, dict[str, float]]:
    """Each method at each learning rate of the grid on seeds 100.., scored on the validation reviews.

    Returns (grid, chosen). The best mean validation accuracy wins; with ~110 validation reviews ties are
    common, and the lower mean validation loss breaks them. The test reviews are never looked at here.
    """
    seeds = [100 + i for i in range(cfg.tune_seeds)]
    results = _runs(cfg, task, [(m, lr, s) for m in cfg.methods for lr in cfg.lr_grid for s in seeds], cache_dir)
    grid = (pd.DataFrame(results).groupby(["method", "lr"], sort=False)
            .agg(val_acc_mean=("val_acc", "mean"), val_loss_mean=("val_loss", "mean"),
                 val_acc=("val_acc", lambda a: " ".join(f"{v:.4f}" for v in a)), seconds=("seconds", "sum"))
            .reset_index())
    best = grid.sort_values(["val_acc_mean", "val_loss_mean"], ascending=[False, True], kind="stable")
    chosen = best.drop_duplicates("method").set_index("method")["lr"]
    return grid, {m.name: float(chosen[m.name]) for m in cfg.methods}


def run_sweep(cfg: TextConfig, task: TextTask, lrs: dict[str, float], cache_dir: Path = CACHE) -> pd.DataFrame:
    """Every method on seeds 0..cfg.seeds-1 at its chosen learning rate: one row per method and seed."""
    missing = [m.name for m in cfg.methods if m.name not in lrs]
    if missing:
        raise ValueError(f"no learning rate for {missing}: run `python text_experiment.py tune` first")
    results = _runs(cfg, task, [(m, lrs[m.name], s) for m in cfg.methods for s in range(cfg.seeds)], cache_dir)
    rows = [{**{k: v for k, v in r.items() if k != "losses"},
             "loss_first_epoch": r["losses"][0], "loss_last_epoch": r["losses"][-1]} for r in results]
    return with_int_columns(pd.DataFrame(rows))
