"""The notebooks' settings: the config a learner runs, and the test-only switches that `make test` sets.

Every switch is an environment variable, unset for a learner:
    LORA_QUICK=1         the tiny config of the tests (its numbers mean nothing)
    LORA_OUT_DIR=DIR     result files under DIR instead of beside the notebook
    LORA_DEVICE=NAME     cpu, cuda or cuda:N instead of CUDA when present
    LORA_NO_PROGRESS=1   no progress bars (make run sets it, so committed notebooks diff cleanly)
"""

import os
from pathlib import Path

import torch

from .methods import resolve_device
from .storage import Outputs


def settings(experiment: str, default, quick) -> tuple[object, Outputs, torch.device, bool]:
    """(config, where the files go, device, whether to show progress bars) for one experiment's notebook."""
    cfg = quick if os.environ.get("LORA_QUICK") else default
    out = Outputs(experiment, Path(os.environ.get("LORA_OUT_DIR", ".")))
    return cfg, out, resolve_device(os.environ.get("LORA_DEVICE", "auto")), not os.environ.get("LORA_NO_PROGRESS")
