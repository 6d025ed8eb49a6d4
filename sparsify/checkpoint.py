"""Method state in checkpoints: what sparsify.prepare attached, saved by save_pretrained, loaded back.

`model.save_pretrained(dir)` writes the codebooks, routers and neuron orders with the weights (they are
parameters and buffers), and config.json carries `sparsify`: which modules hold which state and the
options it was made with (record_state writes it). `AutoModel.from_pretrained(dir)` drops the state
tensors as unexpected keys; then either

    sparsify.load_state(model, dir)                 # explicit
    sparsify.prepare(model, **example, options=...) # finds model.config.sparsify and loads from dir

creates the state on the same modules, with the checkpoint's shapes and dtypes, and loads the values.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .debug import log



def _kinds() -> dict:
    """State kind -> its StateKind (tensor names in the tag's order, made_with), from the registered methods."""
    from .methods import state_kinds
    return state_kinds()


def _kind_of_name(name: str):
    return next((kind for kind, s in _kinds().items() if name in s.tensors), None)


CONFIG_KEY = "sparsify"  # model.config.sparsify: the record save_pretrained writes into config.json


def state_options(kind: str, tensors: Mapping[str, torch.Tensor]) -> dict:
    """The options a state was made with, read off its tensors (they fix them: the guards compare the same)."""
    return _kinds()[kind].made_with(tensors)


def module_states(model: nn.Module) -> dict:
    """{(module path, kind): {attribute name: tensor}} of the state prepare / load_state attached."""
    found = {}
    for path, module in model.named_modules():
        for kind, names in module.__dict__.get("_sparsify_states", {}).items():
            found[(path, kind)] = {n: getattr(module, n) for n in names if hasattr(module, n)}
    return found


def record_state(model: nn.Module) -> None:
    """Write model.config.sparsify (save_pretrained puts it in config.json): per state kind, per module,
    the options the state was made with and the child its tag hook sits on (for a root module)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    record: dict = {}
    for (path, kind), tensors in module_states(model).items():
        entry = state_options(kind, tensors)
        hook = model.get_submodule(path).__dict__.get("_sparsify_hooks", {}).get(kind, "")
        if hook:
            entry["hook"] = hook
        record.setdefault(kind, {})[path] = entry
    setattr(config, CONFIG_KEY, {"state": record} if record else None)


def checkpoint_of(model: nn.Module) -> Optional[str]:
    """The local directory or file the model was loaded from (from_pretrained sets name_or_path), if any."""
    config = getattr(model, "config", None)
    path = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return path if path and os.path.exists(path) else None


def read_state_tensors(checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> dict:
    """{state dict key: tensor} of the sparsify state in a state dict, a weights file (.safetensors or a
    torch.save file) or a save_pretrained directory (sharded or not: the index json names the shards)."""
    if isinstance(checkpoint, Mapping):
        return {k: v for k, v in checkpoint.items() if _kind_of_name(k.rsplit(".", 1)[-1])}
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = os.path.join(path, index_name)
            if os.path.exists(index):
                with open(index) as fh:
                    weight_map = json.load(fh)["weight_map"]
                shards = {f for k, f in weight_map.items() if _kind_of_name(k.rsplit(".", 1)[-1])}
                tensors: dict = {}
                for shard in sorted(shards):
                    tensors.update(read_state_tensors(os.path.join(path, shard)))
                return tensors
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                return read_state_tensors(os.path.join(path, name))
        raise FileNotFoundError(f"sparsify.load_state: no model.safetensors, pytorch_model.bin or their index "
                                f"json in {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as fh:  # read only the state's tensors, not the weights
            return {k: fh.get_tensor(k) for k in fh.keys() if _kind_of_name(k.rsplit(".", 1)[-1])}
    return read_state_tensors(torch.load(path, map_location="cpu", weights_only=True))


def _module_for(model: nn.Module, path: str, modules: dict) -> Optional[str]:
    """The model's name for a checkpoint's module path: as it is, or with the base model prefix dropped or
    added (a checkpoint of LlamaForCausalLM names "model.layers.0", a LlamaModel "layers.0")."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [path]
    if prefix:
        candidates += [path[len(prefix) + 1:] if path.startswith(prefix + ".") else None,
                       f"{prefix}.{path}" if path else prefix]
    return next((c for c in candidates if c is not None and c in modules), None)


def load_state(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
               only_missing: bool = False) -> list:
    """Create the sparsify state of `checkpoint` (a save_pretrained directory, a weights file or a state
    dict) on the model's modules, with the checkpoint's shapes and dtypes, and load its values; the tag hooks
    the compiled graphs read the state through are installed as sparsify.prepare installs them. State the
    module already has is overwritten (in place when the shapes and dtypes agree, so optimizers keep it),
    unless only_missing. Returns the (module path, kind) pairs loaded. Raises when the checkpoint holds state
    for a module the model does not have."""
    from .methods.state import attach_state, detach_state

    tensors = read_state_tensors(checkpoint)
    modules = dict(model.named_modules())
    record = (getattr(getattr(model, "config", None), CONFIG_KEY, None) or {}).get("state", {})
    grouped: dict = {}
    for key, tensor in tensors.items():
        path, _, name = key.rpartition(".")
        target = _module_for(model, path, modules)
        if target is None:
            raise ValueError(f"sparsify.load_state: the checkpoint has {key!r}, but the model has no module "
                             f"{path!r} (model: {type(model).__name__})")
        grouped.setdefault((target, _kind_of_name(name)), {})[name] = tensor
    loaded = []
    for (path, kind), values in sorted(grouped.items()):
        module = modules[path]
        states = module.__dict__.setdefault("_sparsify_states", {})
        if kind in states and only_missing:
            continue
        device = next(module.parameters(), torch.empty(0)).device
        values = {n: values[n].to(device) for n in _kinds()[kind].tensors if n in values}  # the tag's order
        current = {n: getattr(module, n) for n in states.get(kind, ()) if hasattr(module, n)}
        if kind in states and {n: (t.shape, t.dtype) for n, t in current.items()} == \
                {n: (t.shape, t.dtype) for n, t in values.items()}:
            with torch.no_grad():
                for n, t in values.items():
                    current[n].copy_(t)
        else:
            detach_state(module, kind)  # different shapes or options: the checkpoint's state replaces it
            hook = record.get(kind, {}).get(path, {}).get("hook", "")
            attach_state(module, kind, lambda values=values: dict(values), hook)
        loaded.append((path, kind))
        log.info("load_state: %s on %s (%s)", kind, path or "<root>", state_options(kind, values))
    record_state(model)
    return loaded
