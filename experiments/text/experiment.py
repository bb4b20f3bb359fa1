"""How the text experiment plugs into the protocol: one job trains every (learning rate, seed) of a method together,
stacked (stacked.py) over MiniLM, or, for the linear probe, over features the frozen encoder computed once. The run
cache's key includes the sha256 of the weights the runs start from."""

import copy
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from transformers import BertConfig

import lora
import nf4

from .. import figures, report, trainer
from ..methods import Method
from ..protocol import TUNING_SEED, Experiment, failed
from ..storage import DATA_DIR, ROOT, Outputs, pack_bits
from ..trainer import set_seed
from . import data, stacked, table
from .config import TextConfig
from .model import TARGET_SETS, SentimentClassifier, load_encoder, load_tokenizer, tokenize

PACKAGE = Path(__file__).resolve().parents[1]
EVAL_BATCH = 64  # reviews per model in one evaluation pass


@dataclass
class TextSetup:
    """What every run of a task reads: the tokenized reviews on the device, the pretrained encoder, provenance."""
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "train", "val", "test": ids (N, max_len), labels (N,)
    encoder: torch.nn.Module      # pretrained, float32, never trained itself: every run starts from a copy
    weights: dict                 # data.find_minilm's provenance: which file, its sha256
    texts: dict[str, list[str]]   # the reviews of each split, for showing
    record: dict                  # data.split_record: reviews, positives and the rows' sha256 of each split


def load_setup(cfg: TextConfig, device: torch.device, data_root: Path = DATA_DIR, csv: Path | None = None,
               dropout: bool = True) -> TextSetup:
    """The task's reviews split once (stratified, split_seed), tokenized once to exactly cfg.max_len tokens."""
    texts, labels = data.load_reviews(cfg.task, csv)
    idx = data.split_reviews(labels, cfg.val_size, cfg.test_size, cfg.train_size, cfg.split_seed)
    folder, weights = data.find_minilm(data_root)
    tokenizer = load_tokenizer(folder)
    splits, shown = {}, {}
    for name, rows in idx.items():
        shown[name] = [texts[i] for i in rows]
        ids, _ = tokenize(tokenizer, shown[name], cfg.max_len, pad_to_max_len=True)  # (N, max_len), [PAD] = 0
        splits[name] = ids.to(device), torch.as_tensor(labels[rows], device=device)
    return TextSetup(splits, load_encoder(folder, dropout).to(device), weights, shown, data.split_record(labels, idx))


def build_model(setup: TextSetup, method: Method) -> SentimentClassifier:
    """A fresh classifier on a copy of the pretrained encoder, with only what `method` trains left trainable.
    The head is drawn first and LoRA's A after it, from the seed set by the caller. QLoRA (method.nf4): every
    nn.Linear of the encoder becomes an nf4.LinearNF4 first; the new head stays in float32, as in QLoRA."""
    model = SentimentClassifier(copy.deepcopy(setup.encoder), probe=method.kind == "head")
    model.head.to(next(setup.encoder.parameters()).device)
    if method.kind == "head":
        model.encoder.requires_grad_(False)
    elif method.kind == "lora":
        if method.nf4:
            nf4.quantize_model(model.encoder)
        lora.add_lora(model, r=method.rank, targets=TARGET_SETS[method.target_set])
        lora.mark_only_lora_as_trainable(model)
        model.head.requires_grad_(True)  # a new task's head trains in full, as in the paper
    return model


def amp_dtype(cfg: TextConfig, device: torch.device) -> torch.dtype | None:
    """bf16 matmuls on CUDA when cfg.amp; float32 everywhere else. Weights and Adam's state stay float32."""
    return torch.bfloat16 if cfg.amp and device.type == "cuda" else None


def autocast(cfg: TextConfig, device: torch.device):
    dtype = amp_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def features(setup: TextSetup, cfg: TextConfig) -> dict[str, torch.Tensor]:
    """The frozen encoder's mean-pooled embedding (N, 384) of every review, in the weights' dtype: the probe's input,
    computed once per task (the probe's encoder runs in eval mode, so its features never change)."""
    model = SentimentClassifier(setup.encoder).eval()
    out = {}
    for name, (ids, _) in setup.splits.items():
        chunks = []
        for b in ids.split(256):
            with autocast(cfg, ids.device):
                chunks.append(model.embed(b, (b != 0).long()).to(model.head.weight.dtype))  # bf16 -> float32
        out[name] = torch.cat(chunks)
    return out


@torch.no_grad()
def evaluate(logits_of, split: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
    """Each stacked model's right answers (S, N) bool and mean cross-entropy on a split; logits_of(x chunk) ->
    (S, B, 2)."""
    x, y = split
    right, loss = [], 0
    for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)):
        logits = logits_of(xb)  # (S, B, 2)
        right.append(logits.argmax(-1) == yb)
        loss = loss + F.cross_entropy(logits.transpose(1, 2), yb.expand(len(logits), -1), reduction="none").sum(1)
    return torch.cat(right, dim=1), (loss / len(y)).tolist()


def fit_stacked(cfg: TextConfig, setup: TextSetup, method: Method, lrs: list[float], seeds: list[int],
                feats: dict[str, torch.Tensor] | None = None, after_epoch=None):
    """Model i trains at lrs[i] from seed seeds[i], every model in one pass, for cfg.epochs under one schedule
    (warmup, then linear decay to 0 over every epoch). Each model starts as build_model(setup, method) after
    set_seed(seeds[i]) makes it, and sees seed i's data order. after_epoch(logits_of) runs after every epoch.

    Returns (params: the stacked trained tensors, losses: each model's mean loss per epoch, logits_of: a function
    from a chunk of the inputs (N, ...) to every model's logits (S, N, 2), the trainable count, LoRA's alpha)."""
    models = []
    for s in seeds:
        set_seed(s)
        models.append(build_model(setup, method))
    trainable, _ = lora.count_parameters(models[0])
    alphas = {layer.alpha for _, layer in lora.lora_layers(models[0])}
    set_seed(seeds[0] + method.dropout_seed)  # the dropout masks: fixed per method and first seed
    device = setup.splits["train"][0].device
    each = None if after_epoch is None else lambda e: after_epoch(logits_of)
    fit = functools.partial(trainer.fit, seeds=seeds, lrs=lrs, epochs=cfg.epochs, batch_size=cfg.batch_size,
                            linear_decay=True, after_epoch=each)
    if method.kind == "head":  # the stacked heads on the features, through trainer.fit's vmap
        head = models[0].head
        params = trainer.stack([{k: v.detach() for k, v in m.head.named_parameters()} for m in models])
        params = {k: v.requires_grad_(True) for k, v in params.items()}

        def logits_of(x):
            return trainer.forward(head.eval(), params, x)
        losses = fit(head, params, (feats["train"], setup.splits["train"][1]))
    else:
        config: BertConfig = setup.encoder.config
        params = stacked.stack_models(models)

        def train_forward(p, xb):
            with autocast(cfg, device):
                return stacked.forward(p, xb, config, train=True)

        def logits_of(x):
            with autocast(cfg, device):
                return stacked.forward(params, x.expand(len(seeds), -1, -1), config, train=False)
        losses = fit(models[0], params, setup.splits["train"], stacked_forward=train_forward)
    return params, losses, logits_of, trainable, alphas.pop() if len(alphas) == 1 else None


def train_stacked(cfg: TextConfig, setup: TextSetup, method: Method, lrs: list[float], seeds: list[int],
                  feats: dict[str, torch.Tensor] | None = None, test: bool = True) -> list[dict]:
    """fit_stacked, every model scored on validation after every epoch (and on test, where `test`): one record per
    model. The epoch-free fields (val_correct, val_acc, test_acc, test_correct, loss_last_epoch) are the last
    epoch's, which the protocol's search and the equal budget read; the per-epoch lists serve the own budget and
    the curves (records.py)."""
    start = time.perf_counter()
    splits = ("val", "test") if test else ("val",)
    inputs = {name: (feats[name] if method.kind == "head" else setup.splits[name][0], setup.splits[name][1])
              for name in splits}
    right = {name: [] for name in splits}  # per epoch: (S, N) bool on the CPU
    val_loss = []  # the last epoch's, per model

    def score(logits_of):
        for name in splits:
            r, loss = evaluate(logits_of, inputs[name])
            right[name].append(r.cpu())
            if name == "val":
                val_loss[:] = loss
    _, losses, _, trainable, alpha = fit_stacked(cfg, setup, method, lrs, seeds, feats, score)
    seconds = (time.perf_counter() - start) / len(seeds)  # each model's share of the job
    steps = len(setup.splits["train"][1]) // cfg.batch_size
    records = []
    for i, (lr, s) in enumerate(zip(lrs, seeds)):
        val = [int(r[i].sum()) for r in right["val"]]
        records.append({"method": method.name, "kind": method.kind, "rank": method.rank,
                        "targets": method.target_set if method.kind == "lora" else None, "nf4": method.nf4,
                        "alpha": alpha, "lr": lr, "seed": s, "trainable_params": trainable,
                        "val_acc": val[-1] / len(inputs["val"][1]), "val_correct": val[-1], "val_loss": val_loss[i],
                        "test_acc": float("nan"), "seconds": seconds, "steps_per_epoch": steps,
                        "loss_first_epoch": losses[i][0], "loss_last_epoch": losses[i][-1],
                        "epoch_losses": losses[i], "val_correct_epochs": val})
        if test:
            records[-1].update(test_acc=right["test"][-1][i].float().mean().item(),
                               test_correct=pack_bits(right["test"][-1][i]),
                               val_bits_epochs=[pack_bits(r[i]) for r in right["val"]],
                               test_bits_epochs=[pack_bits(r[i]) for r in right["test"]])
    return records


class TextExperiment(Experiment):
    """MiniLM-L6 on one movie-review task: linear probe, full finetuning, LoRA on three target sets."""
    metric, val_metric = "test_acc", "val_acc"
    per_seed_columns = ("method", "kind", "rank", "targets", "nf4", "alpha", "lr", "seed", "trainable_params",
                        "val_acc", "val_loss", "test_acc", "seconds", "steps_per_epoch", "loss_first_epoch",
                        "loss_last_epoch", "test_correct", "epoch_losses", "val_correct_epochs", "val_bits_epochs",
                        "test_bits_epochs")
    classes = 2
    cache = ROOT / "runs" / "text"

    def __init__(self, cfg: TextConfig, device: torch.device, data_root: Path = DATA_DIR):
        super().__init__(cfg, device)
        self.name = f"text_{cfg.task}"
        self.data_root = data_root
        self.setup = functools.cache(lambda: load_setup(cfg, device, data_root))
        self.features = functools.cache(lambda: features(self.setup(), cfg))
        self.weights = functools.cache(lambda: data.find_minilm(data_root)[1])

    def code_files(self) -> list[Path]:
        return ([ROOT / "lora.py", ROOT / "nf4.py"] + [PACKAGE / f for f in ("methods.py", "trainer.py")]
                + [PACKAGE / "text" / f for f in ("config.py", "data.py", "model.py", "stacked.py", "experiment.py")])

    def key_extra(self) -> list:
        return [self.weights()["sha256"]]

    def tune_command(self) -> str:
        return "python -m experiments tune --experiment text"

    def train(self, shared, method: Method, lrs: tuple[float, ...], seeds: list[int]) -> list[dict]:
        pairs = [(lr, s) for lr in lrs for s in seeds]  # learning-rate major, as the protocol reads them
        feats = self.features() if method.kind == "head" else None
        # Tuning never looks at the test reviews.
        return train_stacked(self.cfg, self.setup(), method, [lr for lr, _ in pairs], [s for _, s in pairs], feats,
                             test=seeds[0] < TUNING_SEED)

    def summarize(self, per_seed: pd.DataFrame) -> pd.DataFrame:
        cfg = self.cfg
        failed_runs = failed(per_seed["loss_first_epoch"], per_seed["loss_last_epoch"], per_seed["val_acc"], self.classes)
        return report.summarize(per_seed.assign(diverged=failed_runs), self.methods, self.metric, cfg.margin,
                                ("diverged",), budget={"epochs": cfg.epochs, "batch_size": cfg.batch_size,
                                                       "max_len": cfg.max_len})

    def plot(self, results: pd.DataFrame):
        cfg = self.cfg
        return figures.plot(results, f"MiniLM-L6 on {table.TASK_LABELS[cfg.task]} ({self.setup().record['train']['reviews']:,}"
                                     f" training reviews): every method {cfg.epochs} epochs at batch size "
                                     f"{cfg.batch_size}", "test accuracy, positive vs negative review", cfg.margin)

    def readme_block(self, results: pd.DataFrame, config: dict, runner_up: pd.DataFrame | None = None) -> str:
        """The block covers every task: it reads results/text.csv, which `table.combine` writes."""
        return table.readme_block(ROOT)

    def skip_without_gpu(self, out: Outputs) -> str | None:
        """None on a CUDA machine; elsewhere why `make run` keeps the committed text results."""
        if torch.cuda.is_available():
            return None
        took = table.training_time(Path(out.root))
        took = f" (the committed run trained for {took})" if took else ""
        return (f"text experiment skipped: it needs a CUDA GPU{took}; results/text* left as they are. "
                "On a machine with one: make text")

