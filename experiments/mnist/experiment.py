"""How an MNIST run plugs into the protocol: pretrain one base model per seed on task A (digits 0-4), then
adapt every seed's base to task B (digits 5-9) with one method at each of its learning rates, all models of a
job trained together by the stacked trainer."""

import contextlib
import warnings
from pathlib import Path

import pandas as pd
import torch

import lora

from .. import figures, report
from ..methods import Method
from ..protocol import TUNING_SEED, Experiment, diverged
from ..storage import ROOT, cached, pack_bits
from ..trainer import accuracy, correct, fit, set_seed, stack
from . import stacked_mlp
from .config import Config
from .models import add_adapter, make_model
from .tasks import load_tasks

PACKAGE = Path(__file__).resolve().parents[1]
# The reference notebook's published table (github.com/sunildkumar/lora_from_scratch): trainable parameters and
# test accuracy. Its "full finetune" was trained and tested on digits 0-4 by a bug; its LoRA runs got up to
# 100 epochs x ~421 steps = ~42,100 steps, about 40x the 1,050 of ours.
REFERENCE = {"full": (54_700, 0.984), 1: (1_045, 0.8747), 2: (2_090, 0.9314955), 4: (4_180, 0.9640),
             8: (8_360, 0.9710), 16: (16_720, 0.9765), 32: (33_440, 0.9796), 64: (66_880, 0.9804567)}


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


def finetune(cfg: Config, tasks, seeds: list[int], base: dict[str, torch.Tensor], method: Method,
             lrs: tuple[float, ...], test: bool = True) -> dict:
    """Adapt every seed's pretrained model to task B with one method, at each learning rate of `lrs`: all
    len(lrs) x len(seeds) models train together, model (i, j) at lrs[i] from seed j's base. Returns one list
    per measure, ordered as the models (learning-rate major). test: also score on the test sets (tuning does
    not look at them)."""
    L = len(lrs)
    seeds_all = [s for _ in lrs for s in seeds]  # (L * S,): learning-rate major
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
           "losses": losses, "val_acc_B": val.float().mean(-1).tolist(), "val_correct": val.sum(-1).tolist()}
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
    per_seed_columns = ("method", "rank", "targets", "dora", "alpha", "seed", "lr", "trainable_params", "acc_B",
                        "acc_A_after", "acc_A_disabled", "acc_A_pretrained", "acc_B_pretrained",
                        "loss_first_epoch", "loss_last_epoch", "test_correct")
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
        return ([ROOT / "lora.py"] + [PACKAGE / f for f in ("methods.py", "trainer.py", "protocol.py")]
                + [PACKAGE / "mnist" / f for f in mnist])

    def prepare(self, seeds: list[int], folder: Path) -> dict:
        return cached(folder / "pretrain.pt", lambda: pretrain(self.cfg, self.tasks(), seeds))

    def train(self, base: dict, method: Method, lrs: tuple[float, ...], seeds: list[int]) -> list[dict]:
        if seeds[0] >= TUNING_SEED:  # tuning never looks at the test images
            r = finetune(self.cfg, self.tasks(), seeds, base["params"], method, lrs, test=False)
            return [{"method": r["method"], "seed": s, "lr": r["lrs"][i], "val_acc_B": r["val_acc_B"][i],
                     "val_correct": r["val_correct"][i], "loss_last_epoch": r["losses"][i][-1]}
                    for i, s in enumerate(r["seeds"])]
        r = finetune(self.cfg, self.tasks(), seeds, base["params"], method, lrs)
        disabled = r.get("acc_A_disabled", [None] * len(r["seeds"]))
        return [{"method": r["method"], "rank": r["rank"], "targets": r["targets"], "dora": r["dora"],
                 "alpha": r["alpha"], "seed": s, "lr": r["lrs"][i], "trainable_params": r["trainable_params"],
                 "acc_B": r["acc_B"][i], "acc_A_after": r["acc_A_after"][i], "acc_A_disabled": disabled[i],
                 "acc_A_pretrained": base["acc_A"][i % len(seeds)], "acc_B_pretrained": base["acc_B"][i % len(seeds)],
                 "loss_first_epoch": r["losses"][i][0], "loss_last_epoch": r["losses"][i][-1],
                 "val_acc_B": r["val_acc_B"][i], "val_correct": r["val_correct"][i],
                 "test_correct": r["test_correct"][i]} for i, s in enumerate(r["seeds"])]

    def summarize(self, per_seed: pd.DataFrame) -> pd.DataFrame:
        per_seed = per_seed.assign(diverged=diverged(per_seed["loss_last_epoch"], self.classes))
        return report.summarize(per_seed, self.methods, self.metric, ("acc_A_after", "acc_A_pretrained", "diverged"),
                                {"epochs": self.cfg.finetune_epochs, "batch_size": self.cfg.batch_size})

    def table(self, results: pd.DataFrame) -> pd.DataFrame:
        return report.table(results, self.cfg.model != "mlp", "test accuracy on 5-9",
                            {"accuracy on 0-4 after finetuning": "acc_A_after_mean"})

    def plot(self, results: pd.DataFrame):
        cfg = self.cfg
        title = "MLP 784-64-64-5" if cfg.model == "mlp" else "Row transformer (row_transformer.py)"
        return figures.plot(results, f"{title}, MNIST 0-4 → 5-9: LoRA against full finetuning, every method "
                                     f"{cfg.finetune_epochs} epochs at batch size {cfg.batch_size}",
                            "test accuracy on digits 5-9 (task B)", reference_lines if cfg.model == "mlp" else None)

    def readme_block(self, results: pd.DataFrame, config: dict) -> str:
        c, env = config["config"], config["environment"]
        images = (f"the {60_000 - c['val_size']:,} training images outside the validation split"
                  if c["train_subset"] is None else f"{c['train_subset']:,} of the training images")
        n_b = len(self.tasks()["B"]["train"][1])  # the digits 5-9 among the training images
        return report.markdown(self.table(results)) + (
            f"\n\n{c['seeds']} seeds, {images}, of which each finetuning run sees the {n_b:,} of digits 5-9; "
            f"every method {c['finetune_epochs']} epochs at batch size {c['batch_size']} with Adam (warmup, cosine "
            f"schedule, gradient norm clipped at 1), after {c['pretrain_epochs']} epochs of pretraining on 0-4, which "
            f"reach {results['acc_A_pretrained_mean'].iloc[0]:.3f} on the 0-4 test set (mean over seeds); learning "
            f"rates chosen on {c['tune_seeds']} tuning seeds. Made on {report.machine(env)}."
            "\n\n"
            + report.findings(results, self.cfg.model != "mlp")
            + (" " + against_reference(results) if self.cfg.model == "mlp" else ""))


def against_reference(results: pd.DataFrame) -> str:
    """Our LoRA means against the reference notebook's one-seed table, rank by rank: higher, lower, or within
    half a point of it."""
    ours = results[(results["method"] != "full") & ~results["dora"].astype(bool)].set_index("rank")["acc_B_mean"]
    groups = {}
    for r, acc in ours.items():
        if r in REFERENCE:
            d = acc - REFERENCE[r][1]
            side = "within half a point" if abs(d) <= 0.005 else f"{'higher' if d > 0 else 'lower'} by more than half a point"
            groups.setdefault(side, []).append(f"r={r}: {acc:.3f} against {REFERENCE[r][1]:.3f}")
    return ("Against the reference notebook's one-seed LoRA table (trained up to ~40x our steps), ours is "
            + "; ".join(f"{side} at {', '.join(pairs)}" for side, pairs in groups.items()) + ".")


def reference_lines(ax) -> None:
    """The reference notebook's LoRA table as a dashed line, and its full finetune as the bug it is."""
    ref_r = [r for r in REFERENCE if r != "full"]
    ax.plot([REFERENCE[r][0] for r in ref_r], [REFERENCE[r][1] for r in ref_r], "s--", color="tab:gray",
            mfc="none", label="LoRA, reference notebook (1 seed, up to ~40× our steps)")
    ax.plot(*REFERENCE["full"], "x", color="0.75", ms=8, mew=2,
            label="full finetune, reference notebook: not comparable,\na bug trained and tested it on digits 0-4")
