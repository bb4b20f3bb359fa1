"""How an MNIST run plugs into the protocol: pretrain one base model per seed on task A (digits 0-4), then
adapt every seed's base to task B (digits 5-9) with one method at each of its learning rates, all models of a
job trained together by the stacked trainer."""

import contextlib
import warnings
from pathlib import Path

import pandas as pd
import torch

import lora
import nf4

from ..methods import Method
from ..protocol import TUNING_SEED, Experiment
from ..storage import ROOT, cached, pack_bits
from ..trainer import accuracy, correct, fit, set_seed, stack
from . import report as mnist_report
from . import stacked_mlp
from .config import Config
from .models import add_adapter, make_model
from .tasks import load_tasks

PACKAGE = Path(__file__).resolve().parents[1]
def pretrain(cfg: Config, tasks, seeds: list[int]) -> dict:
    """Train one base model per seed on task A. Returns stacked params and accuracies."""
    states = []
    for s in seeds:
        set_seed(s)
        states.append(make_model(cfg.model, cfg.dropout).state_dict())
    device = tasks["A"]["train"][0].device
    params = {k: v.to(device).requires_grad_() for k, v in stack(states).items()}
    model = make_model(cfg.model, cfg.dropout)
    set_seed(seeds[0])
    losses = fit(model, params, tasks["A"]["train"], seeds, [cfg.pretrain_lr] * len(seeds), cfg.pretrain_epochs,
                 cfg.batch_size, stacked_forward=written_out(cfg, {}, 1.0))
    params = {k: v.detach() for k, v in params.items()}
    return {"params": params, "losses": losses, "acc_A": accuracy(model, params, tasks["A"]["test"]),
            "acc_B": accuracy(model, params, tasks["B"]["test"]),
            "val_acc_A": accuracy(model, params, tasks["A"]["val"])}


def written_out(cfg: Config, frozen: dict[str, torch.Tensor], scaling: float):
    """The MLP's training forward written for stacked models (stacked_mlp.py: the same arithmetic as vmap over
    lora.py's layers, laid out for the CPU); None for the transformer, which trains through vmap. (Written out,
    the transformer's step was only 5% faster on the CPU: bench/README.md, "Where the time goes".)"""
    if cfg.model != "mlp":
        return None
    return lambda params, x: stacked_mlp.forward(params, frozen, x, scaling, cfg.dropout, training=True)


@contextlib.contextmanager
def quiet_rank_warning():
    """r > 5 on the MLP's 5-way head is wanted here, as the reference did: silence that warning, here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"r=\d+ exceeds")
        yield


def initial_adapters(cfg: Config, method: Method, seeds: list[int], base: dict[str, torch.Tensor]) -> dict:
    """Each seed's adapter tensors at initialisation, stacked (S, ...): A drawn from the seed alone (not from how
    many seeds run together), B = 0, and DoRA's magnitude the row norms of that seed's pretrained W."""
    adapters = []
    with quiet_rank_warning():
        for i, s in enumerate(seeds):
            set_seed(s)
            with_lora = make_model(cfg.model, cfg.dropout)
            with_lora.load_state_dict({k: v[i] for k, v in base.items()})
            add_adapter(with_lora, method)
            adapters.append({n: p.detach() for n, p in with_lora.named_parameters()
                             if n.rsplit(".", 1)[-1] in lora.ADAPTER_NAMES})
    device = next(iter(base.values())).device
    return {k: v.to(device) for k, v in stack(adapters).items()}


def four_bit(cfg: Config, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each seed's pretrained base with its hidden layers' weights as QLoRA computes with them: quantized to NF4
    by nf4.quantize_model (blocks of 64, double quantization; the 5-way head kept in full precision, as QLoRA
    keeps the output layer) and dequantized, which is exactly what LinearNF4's forward multiplies by."""
    weights = []
    for i in range(len(next(iter(base.values())))):
        model = make_model(cfg.model, cfg.dropout)
        model.load_state_dict({k: v[i].cpu() for k, v in base.items()})
        names = nf4.quantize_model(model, targets=list(stacked_mlp.LAYERS[:-1]))
        weights.append({f"{n}.weight": model.get_submodule(n).dequantized_weight() for n in names})
    device = next(iter(base.values())).device
    return {**base, **{k: v.to(device) for k, v in stack(weights).items()}}


def finetune(cfg: Config, tasks, seeds: list[int], base: dict[str, torch.Tensor], method: Method,
             lrs: tuple[float, ...], test: bool = True) -> dict:
    """Adapt every seed's pretrained model to task B with one method, at each learning rate of `lrs`: all
    len(lrs) x len(seeds) models train together, model (i, j) at lrs[i] from seed j's base. Returns one list
    per measure, ordered as the models (learning-rate major). test: also score on the test sets (tuning does
    not look at them)."""
    L = len(lrs)
    seeds_all = [s for _ in lrs for s in seeds]  # (L * S,): learning-rate major
    if method.nf4:  # QLoRA: the frozen base as its 4-bit storage gives it back; A and B start as LoRA's
        base = four_bit(cfg, base)
    model = make_model(cfg.model, cfg.dropout)
    alpha, scaling = None, 1.0
    if method.kind == "lora":
        with quiet_rank_warning():
            add_adapter(model, method)
        (alpha,) = {layer.alpha for _, layer in lora.lora_layers(model)}  # as the layers have it: one value
        alpha = int(alpha) if alpha.is_integer() else alpha
        (scaling,) = {layer.scaling for _, layer in lora.lora_layers(model)}
    start = {**base, **(initial_adapters(cfg, method, seeds, base) if method.kind == "lora" else {})}  # (S, ...)
    # every method starts from the pretrained weights; what trains is one copy per model (L * S, ...), what stays
    # frozen one copy per seed (S, ...), shared by that seed's models (trainer.forward)
    params, frozen = {}, {}
    for name, p in model.named_parameters():  # the template model says what trains
        if p.requires_grad:
            params[name] = start[name].repeat(L, *[1] * (start[name].dim() - 1)).requires_grad_()
        else:
            frozen[name] = start[name].clone()
    trainable, total = lora.count_parameters(model)
    set_seed(seeds[0] + method.dropout_seed)
    losses = fit(model, params, tasks["B"]["train"], seeds_all, [lr for lr in lrs for _ in seeds],
                 cfg.finetune_epochs, cfg.batch_size, frozen=frozen,
                 stacked_forward=written_out(cfg, frozen, scaling))
    params = {k: v.detach() for k, v in params.items()}
    score = lambda split: accuracy(model, params, split, frozen)
    val = correct(model, params, tasks["B"]["val"], frozen)  # (L * S, N_val)
    out = {"method": method.name, "rank": method.rank,
           "targets": method.target_set if method.kind == "lora" else None,
           "dora": method.dora, "alpha": alpha, "lrs": [lr for lr in lrs for _ in seeds], "seeds": seeds_all,
           "trainable_params": trainable, "total_params": total,
           "nf4": method.nf4, "losses": losses, "val_acc_B": val.float().mean(-1).tolist(),
           "val_correct": val.sum(-1).tolist()}
    if not test:
        return out
    test_b = correct(model, params, tasks["B"]["test"], frozen)  # (L * S, N_test): kept for the intervals
    out.update(acc_B=test_b.float().mean(-1).tolist(), test_correct=[pack_bits(row) for row in test_b],
               acc_A_after=score(tasks["A"]["test"]))
    if method.kind == "lora" and trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n):
        with lora.disable_lora(model):  # only LoRA was trained, so switching it off must give the base back
            out["acc_A_disabled"] = score(tasks["A"]["test"])
    return out


class MnistExperiment(Experiment):
    """The MLP or the row transformer (cfg.model), MNIST 0-4 -> 5-9."""
    metric, val_metric = "acc_B", "val_acc_B"
    per_seed_columns = ("method", "rank", "targets", "dora", "nf4", "alpha", "seed", "lr", "trainable_params",
                        "acc_B", "val_acc_B", "acc_A_after", "acc_A_disabled", "acc_A_pretrained",
                        "acc_B_pretrained", "loss_first_epoch", "loss_last_epoch", "test_correct")
    classes = 5
    cache = ROOT / "runs"
    parallel_on_cpu = True

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        self.name = cfg.model

    def tasks(self) -> dict:
        """Loaded on first use (only if some run is not cached), once per process."""
        return load_tasks(self.cfg, self.device)

    def code_files(self) -> list[Path]:
        mnist = ("config.py", "models.py", "row_transformer.py", "stacked_mlp.py", "tasks.py", "experiment.py")
        return ([ROOT / "lora.py", ROOT / "nf4.py"] + [PACKAGE / f for f in ("methods.py", "trainer.py")]
                + [PACKAGE / "mnist" / f for f in mnist])

    def prepare(self, seeds: list[int], folder: Path) -> dict:
        return cached(folder / "pretrain.pt", lambda: pretrain(self.cfg, self.tasks(), seeds))

    def train(self, base: dict, method: Method, lrs: tuple[float, ...], seeds: list[int]) -> list[dict]:
        if seeds[0] >= TUNING_SEED:  # tuning never looks at the test images
            r = finetune(self.cfg, self.tasks(), seeds, base["params"], method, lrs, test=False)
            return [{"method": r["method"], "seed": s, "lr": r["lrs"][i], "val_acc_B": r["val_acc_B"][i],
                     "val_correct": r["val_correct"][i], "loss_first_epoch": r["losses"][i][0],
                     "loss_last_epoch": r["losses"][i][-1]}
                    for i, s in enumerate(r["seeds"])]
        r = finetune(self.cfg, self.tasks(), seeds, base["params"], method, lrs)
        disabled = r.get("acc_A_disabled", [None] * len(r["seeds"]))
        return [{"method": r["method"], "rank": r["rank"], "targets": r["targets"], "dora": r["dora"], "nf4": r["nf4"],
                 "alpha": r["alpha"], "seed": s, "lr": r["lrs"][i], "trainable_params": r["trainable_params"],
                 "acc_B": r["acc_B"][i], "acc_A_after": r["acc_A_after"][i], "acc_A_disabled": disabled[i],
                 "acc_A_pretrained": base["acc_A"][i % len(seeds)], "acc_B_pretrained": base["acc_B"][i % len(seeds)],
                 "loss_first_epoch": r["losses"][i][0], "loss_last_epoch": r["losses"][i][-1],
                 "val_acc_B": r["val_acc_B"][i], "val_correct": r["val_correct"][i],
                 "test_correct": r["test_correct"][i]} for i, s in enumerate(r["seeds"])]

    # Reporting lives in mnist/report.py, outside the run cache's key: editing it never throws a trained run away.
    def summarize(self, per_seed: pd.DataFrame) -> pd.DataFrame:
        return mnist_report.summarize(self, per_seed)

    def table(self, results: pd.DataFrame, runner_up: pd.DataFrame | None = None) -> pd.DataFrame:
        return mnist_report.table(self, results, runner_up)

    def plot(self, results: pd.DataFrame):
        return mnist_report.plot(self, results)

    def readme_block(self, results: pd.DataFrame, config: dict, runner_up: pd.DataFrame | None = None) -> str:
        return mnist_report.readme_block(self, results, config, runner_up)
