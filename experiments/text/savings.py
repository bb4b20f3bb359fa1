"""What LoRA and QLoRA save on MiniLM, per method: trainable parameters, Adam's state, the bytes of the checkpoint
one must keep, the bytes of the frozen base in memory, and the peak GPU memory of a training step of one model
(batch_size reviews of max_len tokens, bf16 autocast, Adam). -> results/text_savings.csv

The stacked trainer (stacked.py) trains QLoRA over the dequantized NF4 weights, many models per pass, so its memory
says nothing about one model's: here each method trains alone, as a user would, through Hugging Face's BertModel
with lora.py and nf4.LinearNF4. Peak memory needs CUDA; on a CPU that column stays empty.
"""

from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

import lora
import nf4

from ..methods import Method
from ..storage import atomic_write
from ..trainer import set_seed
from . import records
from .experiment import TextExperiment, autocast, build_model

COLUMNS = ["method", "trainable_params", "optimizer_state_bytes", "checkpoint_bytes", "base_bytes", "peak_gpu_mib"]


def path(root: Path) -> Path:
    return records.savings_path(root)


def methods(exp: TextExperiment) -> list[Method]:
    """Full finetuning, then LoRA and QLoRA at wide_rank on Wq, Wv and on every nn.Linear."""
    r = exp.cfg.wide_rank
    return [Method("full")] + [Method("lora", r, t, nf4=q) for q in (False, True) for t in ("qv", "all")]


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def checkpoint_bytes(model: torch.nn.Module, method: Method) -> int:
    """Full finetuning keeps every tensor; LoRA and QLoRA keep lora.lora_state_dict (adapters, head, settings): the
    base is the pretrained file, quantized again by nf4.quantize_model where it was 4-bit."""
    state = model.state_dict() if method.kind == "full" else lora.lora_state_dict(model)
    return tensor_bytes(state.values())


def base_bytes(model: torch.nn.Module) -> int:
    """The frozen weights as held in memory: float32 tensors, NF4 codes and scales."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return tensor_bytes(frozen) + nf4.nf4_bytes(model)


def peak_gpu_mib(exp: TextExperiment, model: torch.nn.Module, steps: int = 3) -> float:
    """Peak CUDA memory (MiB, torch.cuda.max_memory_allocated) over `steps` training steps of one model on the
    first training batch, the model's own weights included; NaN off CUDA."""
    if exp.device.type != "cuda":
        return float("nan")
    ids, y = (t[:exp.cfg.batch_size] for t in exp.setup().splits["train"])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.cuda.synchronize(exp.device)
    torch.cuda.reset_peak_memory_stats(exp.device)
    model.train()
    for _ in range(steps):
        with autocast(exp.cfg, exp.device):
            loss = F.cross_entropy(model(ids, (ids != 0).long()).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(exp.device)
    return torch.cuda.max_memory_allocated(exp.device) / 2**20


def measure(exp: TextExperiment) -> pd.DataFrame:
    rows = []
    for method in methods(exp):
        set_seed(0)
        model = build_model(exp.setup(), method)
        trainable, _ = lora.count_parameters(model)
        rows.append({"method": method.name, "trainable_params": trainable,
                     "optimizer_state_bytes": 2 * 4 * trainable,  # Adam's m and v, float32
                     "checkpoint_bytes": checkpoint_bytes(model, method), "base_bytes": base_bytes(model),
                     "peak_gpu_mib": peak_gpu_mib(exp, model)})
        del model
        if exp.device.type == "cuda":
            torch.cuda.empty_cache()
    return pd.DataFrame(rows, columns=COLUMNS)


def write(root: Path, exp: TextExperiment) -> pd.DataFrame:
    table = measure(exp)
    atomic_write(path(root), table.to_csv(index=False, float_format="%.1f").encode())
    return table
