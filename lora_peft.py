"""
Hugging Face PEFT's adapter format for lora.py: save_peft_adapter writes a folder that PEFT's
PeftModel.from_pretrained loads, load_peft_adapter reads one that PEFT's save_pretrained wrote.

Optional: copy this file beside lora.py if you want PEFT's files. It imports lora and safetensors
(`pip install safetensors`); lora.py itself needs torch alone.
"""

import json
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import lora

# A folder with adapter_config.json (a LoraConfig) and adapter_model.safetensors, keyed
#   base_model.model.<path>.lora_A.weight  (r, in)     base_model.model.<path>.lora_B.weight  (out, r)
#   base_model.model.<path>.lora_magnitude_vector (out,), for DoRA
#   base_model.model.<path>.lora_embedding_A  (r, num_embeddings)   .lora_embedding_B  (dim, r), for nn.Embedding
#   a convolution's lora_A.weight (r, in, *kernel) and lora_B.weight (out, r, 1, ...), as lora.py holds them
#   an nn.MultiheadAttention's <path>.lora_A.weight (r, E), .lora_B.weight (3E, r) over in_proj_weight, and its
#   out_proj's <path>.base_layer.out_proj.lora_A.weight ...: PEFT's target_modules name the attention only
# transformers' Conv1D (GPT-2) stores W as (in, out): PEFT's config says fan_in_fan_out=True; A and B keep the
# shapes above, and PEFT itself sets fan_in_fan_out per layer from its type, so we write True when any layer is a
# Conv1D and read it from each layer's type.
#   base_model.model.<path>.base_layer.bias  for the bias of a LoRA layer, <path>.bias for any other bias
#   base_model.model.<module>.<name>  for each tensor of a module in modules_to_save
# PEFT selects target_modules by regex (a string, matching the whole name) or by list (the whole name or its
# dotted end), modules_to_save by name suffix, and rank_pattern/alpha_pattern keys by regex on the name's end.

PEFT_PREFIX = "base_model.model."
_PEFT_READ = {"peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "bias",
              "fan_in_fan_out",
              "use_rslora", "use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "init_lora_weights"}
_PEFT_BOOKKEEPING = {"peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
                     "inference_mode", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
                     "corda_config", "lora_ga_config", "runtime_config"}  # no effect on a loaded adapter
PEFT_VERSION = "0.22.0"  # the semantics we write: PEFT 0.22's, where an attention's out_proj update counts once
_PEFT_INITS = (True, False, "gaussian", "eva", "orthogonal")  # the others change W or the layer (pissa, loftq, ...)


def _peft_selects(targets: str | list[str], name: str) -> bool:
    """Whether PEFT's target_modules (or exclude_modules) select the module called `name`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _peft_pattern(patterns: dict, name: str, default):
    """The value PEFT's rank_pattern or alpha_pattern gives module `name`: the first key matching its end."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)), default)


def _attention_part(model: nn.Module, name: str) -> bool:
    """Whether module `name` is an nn.MultiheadAttention's out_proj, whose adapter comes with the attention's."""
    parent = model.get_submodule(name.rpartition(".")[0])
    return isinstance(parent, (nn.MultiheadAttention, lora.LoRAMultiheadAttention))


def _peft_trained(model: nn.Module, layers: dict[str, lora.LoRALayer]) -> tuple[str, list[str]]:
    """(PEFT's `bias` setting, its `modules_to_save`) for what is trainable in the model besides the adapters."""
    modules_to_save = []
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, lora.LoRALayer) and module.weight.requires_grad:
            raise ValueError(f"layer {name!r} trains its base weight W, which PEFT's format cannot hold "
                             "(lora.mark_only_lora_as_trainable freezes it)")
        if not isinstance(module, lora.LoRALayer) and ".lora_adapters." not in f".{name}." and \
                any(p.requires_grad for n, p in own.items() if n != "bias"):
            if frozen := [n for n, p in own.items() if not p.requires_grad]:
                raise ValueError(f"module {name!r} trains some of its parameters but not {frozen}; PEFT saves a "
                                 "module trained in full (modules_to_save) or only the biases")
            modules_to_save.append(name)
    trained = set(lora.trained_biases(model))
    lora_only = {f"{n}.bias" for n, layer in layers.items() if layer.bias is not None}
    every = {f"{n}.bias" for n, m in model.named_modules()
             if isinstance(getattr(m, "bias", None), nn.Parameter) and n not in modules_to_save}
    for mode, biases in (("none", set()), ("lora_only", lora_only), ("all", every)):
        if trained == biases:
            return mode, modules_to_save
    raise ValueError(f"the trainable biases {sorted(trained)} are neither every bias (PEFT's bias='all') nor those "
                     "of the LoRA layers ('lora_only'): set them with lora.mark_only_lora_as_trainable(bias=...)")


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str | list[str] | None = None) -> None:
    """Write the model's adapters as PEFT's save_pretrained does, so PeftModel.from_pretrained(base, directory)
    (and load_adapter(directory / name, name) for a named one) reproduces its outputs.

    `adapter`: a name or a list (None: every adapter). As PEFT, "default" goes into `directory`, any other into
    `directory / name`; several adapters share one copy of the trained biases and modules_to_save in lora.py, so
    those are written only for a single adapter.
    adapter_config.json: r and lora_alpha are the most common values, rank_pattern and alpha_pattern name the
    layers that differ; `bias` ("none", "all", "lora_only") is read off the trainable biases; every other module
    with trainable parameters (a classifier head trained in full) becomes `modules_to_save`; `peft_version` says
    whose semantics the file follows (PEFT_VERSION: an attention's out_proj update counts once).
    adapter_model.safetensors: the tensors, named as PEFT names them. Everything is checked before writing.
    """
    from safetensors.torch import save_file

    if not any(True for _ in lora.lora_layers(model)):
        raise ValueError("model has no LoRA layers to save (call lora.add_lora first)")
    names = lora.adapter_names(model) if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)
    if unknown := [a for a in names if a not in lora.adapter_names(model)]:
        raise ValueError(f"adapters {unknown} are not the model's: {lora.adapter_names(model)}")
    files = {a: _peft_files(model, a, alone=len(names) == 1) for a in names}  # every check before any write
    for a, (config, tensors) in files.items():
        folder = Path(directory) if a == lora.DEFAULT else Path(directory) / a
        folder.mkdir(parents=True, exist_ok=True)
        save_file({PEFT_PREFIX + k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
                  folder / "adapter_model.safetensors", metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _peft_files(model: nn.Module, adapter: str, alone: bool) -> tuple[dict, dict]:
    """(adapter_config.json, {PEFT's tensor name without its prefix: tensor}) for one adapter of the model."""
    layers = {n: layer for n, layer in lora.lora_layers(model) if adapter in layer.configs}
    configs = {n: layer.configs[adapter] for n, layer in layers.items()}
    if merged := [n for n, layer in layers.items() if layer.merged]:
        raise ValueError(f"layers {merged} are merged, so their weight is not the base model's: unmerge() them")
    if odd := [n for n, layer in layers.items() if isinstance(layer, lora.LoRAConv) and (
            set(layer.base_skeleton.dilation) != {1} or layer.base_skeleton.padding_mode != "zeros")]:
        raise ValueError(f"convolutions {odd} are dilated or pad other than with zeros, which PEFT's lora_A drops "
                         "(PEFT would compute another function, or fail): save them with lora.lora_state_dict")
    for setting in ("use_rslora", "use_dora", "dropout"):
        if len({getattr(c, setting) for c in configs.values()}) > 1:
            raise ValueError(f"PEFT's format holds one {setting} for all layers, but they differ: "
                             f"{ {n: getattr(c, setting) for n, c in configs.items()} }")
    bias, modules_to_save = _peft_trained(model, layers)
    if not alone and (bias != "none" or modules_to_save):
        raise ValueError(f"PEFT keeps trained biases ({bias!r}) and modules_to_save {modules_to_save} per adapter, "
                         "lora.py one copy for all: save one adapter (adapter='name') with them, or freeze them")
    names = [n for n, _ in model.named_modules() if n]
    for t in modules_to_save:
        if others := [n for n in names if n.endswith(t) and n != t]:
            raise ValueError(f"PEFT picks modules_to_save by the end of the name, so {t!r} would also pick {others}")
    parts = {n for n in layers if _attention_part(model, n)}
    targets = [n for n in layers if n not in parts]
    if {n for n in names if _peft_selects(targets, n)} != set(targets) | parts:  # a name is the dotted end of another
        targets = "(" + "|".join(map(re.escape, targets)) + ")"
    ranks, alphas = [c.r for c in configs.values()], [c.alpha for c in configs.values()]
    r, alpha = max(ranks, key=ranks.count), max(alphas, key=alphas.count)
    number = lambda a: int(a) if float(a).is_integer() else a
    first = next(iter(configs.values()))
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
              "peft_version": PEFT_VERSION,
              "r": r, "lora_alpha": number(alpha), "target_modules": targets, "lora_dropout": first.dropout,
              "use_rslora": first.use_rslora, "use_dora": first.use_dora, "bias": bias,
              "modules_to_save": modules_to_save or None, "init_lora_weights": True,
              "fan_in_fan_out": any(isinstance(layer, lora.LoRAConv1D) for layer in layers.values()),
              "rank_pattern": {"^" + re.escape(n): c.r for n, c in configs.items() if c.r != r and n not in parts},
              "alpha_pattern": {"^" + re.escape(n): number(c.alpha) for n, c in configs.items()
                                if c.alpha != alpha and n not in parts}}
    tensors = {}
    for n, layer in layers.items():
        t = layer.adapter_tensors(adapter)
        n = n.removesuffix("out_proj") + "base_layer.out_proj" if n in parts else n
        a, b = ("lora_embedding_A", "lora_embedding_B") if isinstance(layer, lora.LoRAEmbedding) else \
            ("lora_A.weight", "lora_B.weight")
        tensors[f"{n}.{a}"], tensors[f"{n}.{b}"] = t["lora_A"], t["lora_B"]
        if "lora_magnitude" in t:
            tensors[f"{n}.lora_magnitude_vector"] = t["lora_magnitude"]
    if bias != "none":
        for key in lora.trained_biases(model):
            path = key.rpartition(".")[0]
            tensors[f"{path}.base_layer.bias" if path in layers else key] = model.get_parameter(key)
    for m in modules_to_save:
        tensors.update({f"{m}.{k}": v for k, v in model.get_submodule(m).state_dict().items()})
    return config, tensors


def _check_peft_config(config: dict, folder: Path, check_alone: bool = True) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"peft_type {config.get('peft_type')!r} is not supported, only 'LORA' (LoRA and DoRA)")
    if unsupported := {k: v for k, v in config.items()
                       if k not in _PEFT_READ | _PEFT_BOOKKEEPING and v not in (None, False, {}, [], "")}:
        raise ValueError(f"adapter settings {unsupported} are not supported: load_peft_adapter honours "
                         f"{sorted(_PEFT_READ)} and needs every other setting at its default")
    if config.get("init_lora_weights", True) not in _PEFT_INITS:
        raise ValueError(f"init_lora_weights={config['init_lora_weights']!r} is not supported: it changes the base "
                         f"weights or the layer; accepted: {_PEFT_INITS}")
    if config.get("bias", "none") not in lora.BIAS_MODES:
        raise ValueError(f"bias={config['bias']!r} is not supported; accepted: {lora.BIAS_MODES}")
    if check_alone and (others := sorted(p.parent.name for p in folder.glob("*/adapter_config.json"))):
        raise ValueError(f"{folder} holds several adapters (also {others}); load one adapter's folder, or all of "
                         "them with load_peft_adapters")


def _sort_peft_tensors(tensors: dict, to_save: list[str], config: dict) -> tuple[dict, dict]:
    """PEFT's tensors sorted: ({LoRA module: {"lora_A" | "lora_B" | "lora_magnitude": tensor}},
    {our state_dict key: tensor} for biases and modules_to_save)."""
    adapters, loads, base_layer_biases = {}, {}, set()
    parts = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "lora_magnitude",
             ".lora_embedding_A": "lora_A", ".lora_embedding_B": "lora_B"}
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"tensor {key!r} does not start with {PEFT_PREFIX!r}, as PEFT's names do")
        k = key[len(PEFT_PREFIX):]
        suffix = next((s for s in parts if k.endswith(s)), None)
        owner = next((m for m in to_save if k.startswith(m + ".")), None)
        if suffix is not None:  # an attention's out_proj: <path>.base_layer.out_proj, ours <path>.out_proj
            adapters.setdefault(k[:-len(suffix)].replace(".base_layer.out_proj", ".out_proj"), {})[parts[suffix]] = t
        elif owner is not None and k[len(owner) + 1:].startswith(("modules_to_save.", "original_module.")):
            continue  # PEFT's bias="all" also writes these copies of the module's biases
        elif k.endswith(".base_layer.weight"):  # PEFT saves an adapted embedding's table (new tokens): load it
            loads[k.removesuffix(".base_layer.weight") + ".weight"] = t
        elif k.endswith(".base_layer.bias"):
            base_layer_biases.add(k.removesuffix(".base_layer.bias"))
            loads[k.removesuffix(".base_layer.bias") + ".bias"] = t
        elif owner is not None or k.endswith(".bias"):
            loads[k] = t
        else:
            raise ValueError(f"tensor {key!r} is neither lora_A, lora_B, lora_magnitude_vector, a bias, nor part "
                             f"of a module in modules_to_save {config.get('modules_to_save')}")
    if not adapters:
        raise ValueError("the adapter holds no lora_A or lora_B tensors")
    if odd := base_layer_biases ^ {k[:-5] for k in loads if k.endswith(".bias") and k[:-5] in adapters}:
        raise ValueError(f"biases of {sorted(odd)}: PEFT names the bias of a LoRA layer <path>.base_layer.bias and "
                         "any other <path>.bias")
    return adapters, loads


def _check_peft_layer(model: nn.Module, name: str, got: dict, config: dict,
                      adapters: dict, adapter: str) -> lora.LoRAConfig:
    """The settings of LoRA module `name` of the adapter, after checking that the model can take it."""
    use_dora, targets, modules = bool(config.get("use_dora")), config.get("target_modules"), dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"the adapter has tensors for module {name!r}, which the model lacks")
    part = _attention_part(model, name) and name.rpartition(".")[0] in adapters
    if not part:
        lora.check_target(model, name, use_dora, adapter, why=" (in the adapter)")
    need = ("lora_A", "lora_B", "lora_magnitude") if use_dora else ("lora_A", "lora_B")
    if missing := [p for p in need if p not in got]:
        raise ValueError(f"module {name!r}: the adapter lacks its {missing} (use_dora={use_dora})")
    if extra := [p for p in got if p not in need]:
        raise ValueError(f"module {name!r}: the adapter has {extra}, which use_dora={use_dora} does not use")
    r = _peft_pattern(config.get("rank_pattern") or {}, name, config.get("r", 8))
    alpha = _peft_pattern(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    module = modules[name]
    kind = type(module) if isinstance(module, lora.LoRALayer) else lora.layer_class(module)
    shapes = dict(zip(("lora_A", "lora_B"), kind.shapes(module, r)))
    shapes["lora_magnitude"] = shapes["lora_B"][:1]
    for p, t in got.items():
        if tuple(t.shape) != shapes[p]:
            raise ValueError(f"module {name!r}: {p} has shape {tuple(t.shape)}, but r={r} and the layer need "
                             f"{shapes[p]}")
    try:
        settings = lora.LoRAConfig(r, alpha, config.get("lora_dropout", 0.0), "kaiming",
                                   bool(config.get("use_rslora")), use_dora)
    except ValueError as e:
        raise ValueError(f"module {name!r}: {e}") from None
    if targets not in (None, "all-linear") and not part and not _peft_selects(targets, name):
        raise ValueError(f"the adapter has tensors for {name!r}, which its target_modules {targets!r} do not select")
    if config.get("exclude_modules") and _peft_selects(config["exclude_modules"], name):
        raise ValueError(f"the adapter has tensors for {name!r}, which its exclude_modules select")
    return settings


def _check_peft_coverage(model: nn.Module, adapters: dict, loads: dict, to_save: list[str], config: dict) -> None:
    """Every module the adapter selects has its tensors, and every other tensor has a place of its shape."""
    modules, state, targets = dict(model.named_modules()), model.state_dict(), config.get("target_modules")
    if targets not in (None, "all-linear"):
        if missing := [n for n, m in modules.items() if n and n not in adapters and n not in to_save
                       and lora.layer_class(m) and _peft_selects(targets, n)]:
            raise ValueError(f"target_modules {targets!r} select {missing}, but the adapter has no tensors for them")
    for m in to_save:
        if missing := [f"{m}.{k}" for k in modules[m].state_dict() if f"{m}.{k}" not in loads]:
            raise ValueError(f"modules_to_save module {m!r}: the adapter lacks {missing}")
    for k, t in loads.items():
        if k not in state:
            raise ValueError(f"the adapter has tensor {k!r}, which the model lacks")
        if t.shape != state[k].shape:
            raise ValueError(f"tensor {k!r} has shape {tuple(t.shape)}; the model's has {tuple(state[k].shape)}")


def _old_out_proj(config: dict) -> bool:
    """Whether PEFT computed an attention's out_proj update twice for this file: written before PEFT 0.22.0
    (no peft_version: before 0.18), and not by a 0.21.1+ development version (PEFT's own rule when loading)."""
    version = config.get("peft_version")
    if not version:
        return True
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version.partition("@")[0])
    release = tuple(int(x or 0) for x in found.groups()) if found else (0, 0, 0)
    return release < (0, 21, 1) or ("dev" not in version and release < (0, 22, 0))


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str = lora.DEFAULT) -> list[str]:
    """Load a PEFT LoRA/DoRA adapter folder as adapter `adapter`; returns the wrapped names in module order.

    nn.Linear, transformers' Conv1D (fan_in_fan_out), nn.Embedding (lora_embedding_A/B), convolutions and
    nn.MultiheadAttention (with its out_proj) layers; adapters saved in float16/bfloat16 load as float32 (lora.py's
    adapter dtype on a float32 or half-precision base). A file from PEFT before 0.22 (its `peft_version`, or none)
    with an attention's out_proj adapter loads with that B doubled, with a warning: those versions added the
    update twice, and doubling keeps the outputs that PEFT computed (as PEFT 0.22 does itself).

    Into a model without LoRA, it wraps the layers the adapter has tensors for and loads A, B, DoRA's magnitudes,
    biases and modules_to_save; then leaves trainable what PEFT's get_peft_model would (adapters, the biases of
    `bias`, modules_to_save). Into a model with other adapters, it adds this one beside them, inactive and frozen
    (as PEFT's load_adapter; lora.set_adapter picks it), and refuses biases and modules_to_save, of which lora.py
    keeps one copy. Every setting, key and shape is checked before the model changes; on any error it is left as
    it was.
    """
    return _load_peft(model, Path(directory), adapter, check_alone=True)


def _load_peft(model: nn.Module, folder: Path, adapter: str, check_alone: bool) -> list[str]:
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    _check_peft_config(config, folder, check_alone)
    if existing := [n for n, layer in lora.lora_layers(model) if adapter in layer.configs]:
        raise ValueError(f"model already carries LoRA layers {existing} with adapter {adapter!r}; load_peft_adapter "
                         "adds a new adapter: pass another name (adapter=...), or load into a model without LoRA")
    first = not lora.adapter_names(model)
    modules = dict(model.named_modules())
    to_save = [n for n in modules if n and any(n.endswith(t) for t in config.get("modules_to_save") or [])]
    adapters, loads = _sort_peft_tensors(tensors, to_save, config)
    if not first and (loads or to_save or config.get("bias", "none") != "none"):
        raise ValueError(f"the adapter trains biases or modules_to_save ({sorted(loads) or to_save}), which PEFT "
                         "keeps per adapter and lora.py once: load it into a model without LoRA")
    settings = {name: _check_peft_layer(model, name, got, config, adapters, adapter)
                for name, got in adapters.items()}
    _check_peft_coverage(model, adapters, loads, to_save, config)
    if doubled := [n for n in adapters if _attention_part(model, n)] if _old_out_proj(config) else []:
        warnings.warn(f"{folder} was written by PEFT {config.get('peft_version') or 'before 0.18'}, which added the "
                      f"update of an nn.MultiheadAttention's out_proj twice: its lora_B in {doubled} is doubled so "
                      "that the outputs are those that PEFT computed (as PEFT 0.22 does)", stacklevel=2)

    names = [n for n in modules if n in adapters]  # all checks passed: now change the model
    state = model.state_dict()
    with torch.no_grad():
        for n in names:  # half-precision adapters become float32 ones on a float32 base, as on a half one
            if not _attention_part(model, n):  # an out_proj is wrapped with its attention; a later adapter frozen
                lora.wrap(model, n, settings[n], adapter)
        for n in names:
            for p, t in adapters[n].items():
                layer = model.get_submodule(n)
                layer.adapter_tensors(adapter)[p].copy_(t * 2 if n in doubled and p == "lora_B" else t)
        for k, t in loads.items():
            state[k].copy_(t)
    if first:
        lora.mark_only_lora_as_trainable(model, bias=config.get("bias", "none"))
        for m in to_save:
            modules[m].requires_grad_(True)
    return names


def load_peft_adapters(model: nn.Module, directory: str | os.PathLike) -> dict[str, list[str]]:
    """Load every adapter of a folder that PEFT's save_pretrained wrote with several: "default" from `directory`
    itself (if there), each other from `directory / name`; returns {adapter: its layers}. The first is active."""
    folder = Path(directory)
    names = ([lora.DEFAULT] if (folder / "adapter_config.json").exists() else []) + \
        sorted(p.parent.name for p in folder.glob("*/adapter_config.json"))
    if not names:
        raise ValueError(f"{folder} holds no adapter_config.json, neither itself nor in a subfolder")
    loaded = {}
    for a in names:
        loaded[a] = _load_peft(model, folder if a == lora.DEFAULT else folder / a, a, check_alone=False)
    return loaded
