"""A sweep over transformers itself: a tiny model of every model type in its config registry, checked
against its own eager forward.

For one model type (`run_type`), per attention implementation ("eager", "sdpa") and mode ("train", "eval"):
  blocks  every attention and MLP block of the model has a region in the dense compile's report (whatever its
          decision: a region left dense with a reason is reported, a block without a region is invisible);
  dense   the default rewrite (inner "aot_eager") equals eager;
  spt     SPT with score "exact", keep 1.0, min_seq 0 equals eager;
  routed  prepare + compile with the routed FFN, 2 blocks, top_k 2, gate "none" (all blocks) equals eager.
"Equals": the first floating output within 1e-5 (fp32), and in train mode every parameter gradient of
loss = mean square of that output. Eval mode compares outputs only (under no_grad): dropout is 0 everywhere,
so eval differs from train only in mode-dependent branches, and a second backward compile would double the cost.
Inputs: 2 x 8 input_ids with right padding on the last row (and decoder_input_ids for encoder-decoders).

Which blocks a model has (the "blocks" check) is read off the modules that run in one eager forward (forward
hooks): an attention block is the outermost module whose class name contains "Attention" (BertAttention holds
BertSelfAttention: one block); an MLP block is the outermost module whose class name ends in MLP, Mlp,
FeedForward, FFN, Ffn, FF, Intermediate (BERT's up half), DenseActDense or MoE/Experts; a layer (an entry of a
ModuleList, class name ending in Layer or Block) in which no MLP-named module ran expects one MLP region inside
it (OPT writes fc1/fc2 inline). A block is covered by a region of the same kind at, inside, or above its module
path, one region per block call. Modules that never ran (a vision tower in a text-only call) expect nothing.

Each result is {"status": one of STATUSES, "detail": str}: pass (detail: how many regions took the method),
FAIL (the largest difference, or the uncovered blocks), unsupported-build (why the tiny model or its inputs
could not be made: the model, not sparsify), error (exception type and its first line), timeout (the model's
time box ran out before this check started).
"""
from __future__ import annotations

import inspect
import os
import time
from typing import Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import transformers  # noqa: E402

MODES = ("train", "eval")
IMPLS = ("eager", "sdpa")
CHECKS = ("blocks", "dense", "spt", "routed")
STATUSES = ("pass", "FAIL", "unsupported-build", "error", "timeout")
ATOL = 1e-5
# differences above ATOL but below this are checked against eager fp32 vs fp64 before they count as a FAIL
ROUNDING_CHECK_BELOW = 1e-3
BATCH, SEQ, VOCAB = 2, 8, 128

DENSE_OPTIONS = {"inner": "aot_eager"}
SPT_OPTIONS = {"attention": {"method": "spt", "score": "exact", "keep": 1.0, "min_seq": 0}, "inner": "aot_eager"}
ROUTED_OPTIONS = {"mlp": {"method": "routed", "blocks": 2, "top_k": 2, "gate": "none"}, "inner": "aot_eager"}
METHOD_OF_CHECK = {"dense": ("dense", DENSE_OPTIONS, None), "spt": ("attention", SPT_OPTIONS, "spt"),
                   "routed": ("mlp", ROUTED_OPTIONS, "routed")}

# size attributes set wherever a config has them (through its attribute_map, so GPT-2's n_embd is hidden_size)
SIZES = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "embed_dim": 64, "dim": 64, "word_embed_proj_dim": 64,
    "embedding_size": 64, "projection_dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "n_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "d_kv": 16,
    "intermediate_size": 128, "ffn_dim": 128, "d_ff": 128, "n_inner": 128, "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128, "ffn_hidden_size": 128, "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "vocab_size": VOCAB, "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128,
    "sliding_window": 4, "type_vocab_size": 2, "rotary_dim": 8,  # GPT-J / CodeGen: rotary dims <= head_dim
}
# sizes a default config leaves None to mean "derived" (GPT-2's n_inner: 4 x n_embd); a None sliding_window
# means no window, so it stays None
SET_WHEN_NONE = ("n_inner", "head_dim")
# per-layer lists are rebuilt from num_hidden_layers by the config's own __init__
DROP_KEYS = ("layer_types",)
MLP_SUFFIXES = ("MLP", "Mlp", "FeedForward", "FFN", "Ffn", "FF", "Intermediate", "DenseActDense",
                "DenseGatedActDense", "MoE", "Moe", "MoeBlock", "Experts")
LAYER_SUFFIXES = ("Layer", "Block")


class Unsupported(Exception):
    """The tiny model or its inputs cannot be made: a property of the model type, not of sparsify."""


def model_types() -> list:
    """Every model type with a base model class in transformers' auto registry, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    return sorted(MODEL_MAPPING_NAMES)


def _shrink(values: dict, default_layers: Optional[int]) -> dict:
    """The config's dict with sizes made tiny, dropout off, cache off, token ids inside the vocabulary."""
    out = {}
    for key, value in values.items():
        if key in DROP_KEYS:
            continue
        if isinstance(value, dict) and ("model_type" in value or key.endswith("_config") or key in ("encoder", "decoder")):
            sub_layers = value.get("num_hidden_layers") or value.get("num_layers")
            out[key] = _shrink(value, sub_layers)
            continue
        if key in SIZES and (isinstance(value, int) and not isinstance(value, bool)
                             or value is None and key in SET_WHEN_NONE):
            value = SIZES[key]
        elif isinstance(value, float) and any(word in key for word in ("dropout", "pdrop", "layerdrop", "jitter")):
            value = 0.0  # jitter: MoE routers add training-mode noise (phimoe, switch), random in eager too
        elif (isinstance(value, list) and default_layers and len(value) == default_layers and default_layers > 2):
            value = value[:2]  # another per-layer list
        out[key] = value
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def _fix_token_ids(config, vocab: int) -> None:
    """Token ids (pad, bos, image, ...) of the tiny vocabulary: ids the inputs never draw (vocab-1, vocab-2, ...),
    so a multimodal model called with text only finds no image token."""
    spare = vocab - 1
    for key in sorted(config.to_dict()):
        if key.endswith(("_token_id", "_token_index")) and not key.startswith("decoder_start"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value >= vocab:
                setattr(config, key, spare)
                spare -= 1
    for sub in _sub_configs(config):
        _fix_token_ids(sub, vocab)


def _sub_configs(config) -> list:
    return [v for v in vars(config).values() if isinstance(v, transformers.PretrainedConfig)]


def tiny_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    cls = CONFIG_MAPPING[model_type]
    default = cls()
    values = _shrink(default.to_dict(), getattr(default, "num_hidden_layers", None))
    config = cls.from_dict(values)
    _fix_token_ids(config, VOCAB)
    if getattr(config, "decoder_start_token_id", None) is None and config.is_encoder_decoder:
        config.decoder_start_token_id = 0
    return config


def build(model_type: str, impl: str, seed: int = 0):
    """(model, config): AutoModel.from_config of the tiny config in fp32, or Unsupported with the reason."""
    try:
        config = tiny_config(model_type)
    except Exception as exc:
        raise Unsupported(f"config: {_first_line(exc)}") from None
    torch.manual_seed(seed)
    try:
        model = transformers.AutoModel.from_config(config, attn_implementation=impl)
    except Exception as exc:
        raise Unsupported(f"model ({impl}): {_first_line(exc)}") from None
    return model.float(), config


def make_inputs(model, config, padded: bool = True, seed: int = 1) -> dict:
    """input_ids (+ attention_mask with right padding on the last row, + decoder_input_ids where the
    model takes them), or Unsupported naming the non-text input the forward requires."""
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        raise Unsupported(f"no input_ids: needs {next(iter(params), '?')}")
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "input_ids"]
    if required:
        raise Unsupported(f"needs {', '.join(required)}")
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(4, VOCAB - 16, (BATCH, SEQ), generator=g)}
    if "attention_mask" in params:
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        if padded:
            mask[-1, SEQ - 3:] = 0
        inputs["attention_mask"] = mask
    if "decoder_input_ids" in params and (config.is_encoder_decoder or hasattr(model, "decoder")):
        inputs["decoder_input_ids"] = torch.randint(4, VOCAB - 16, (BATCH, SEQ - 2), generator=g)
    return inputs


def first_float(out) -> torch.Tensor:
    """The first floating tensor of a model output (last_hidden_state for most)."""
    values = out.to_tuple() if hasattr(out, "to_tuple") else (out if isinstance(out, (tuple, list)) else (out,))
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
        if isinstance(value, (tuple, list)):
            try:
                return first_float(value)
            except ValueError:
                pass
    raise ValueError("the output has no floating tensor")


def expected_blocks(model, inputs: dict) -> list:
    """[(kind, module path)] of the attention and MLP blocks one eager forward calls, in call order."""
    names = {m: n for n, m in model.named_modules()}
    calls: list = []

    def kind_of(module) -> Optional[str]:
        cls = type(module).__name__
        if "Attention" in cls:
            return "attention"
        if cls.endswith(MLP_SUFFIXES):
            return "mlp"
        if cls.endswith(LAYER_SUFFIXES) and ".".join(names[module].split(".")[-1:]).isdigit():
            return "layer"
        return None

    hooks = [m.register_forward_pre_hook(lambda mod, args, kind=kind, name=names[m]: calls.append((kind, name)))
             for m in model.modules() if (kind := kind_of(m))]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    blocks = []
    for kind, path in calls:
        if kind == "layer":
            continue
        if any(k == kind and path.startswith(p + ".") for k, p in blocks):
            continue  # inside an outer block of the same kind (BertAttention > BertSelfAttention)
        blocks.append((kind, path))
    for kind, path in calls:  # layers in which no MLP-named module ran, but a Linear outside any token mixer
        if (kind == "layer" and not any(k == "mlp" and (p == path or p.startswith(path + ".")) for k, p in blocks)
                and _has_free_linear(model.get_submodule(path))):
            blocks.append(("mlp", path))
    return blocks


# token mixers that are not attention (state-space and recurrent layers): their Linears are not an MLP
MIXER_WORDS = ("Mixer", "Mamba", "SSM", "Rwkv", "Recurrent", "Attention")


def _has_free_linear(layer) -> bool:
    """Whether a Linear in `layer` sits outside every attention / mixer module (an MLP written inline: GPT-J)."""
    def walk(module) -> bool:
        for child in module.children():
            if any(w in type(child).__name__ for w in MIXER_WORDS):
                continue
            if isinstance(child, torch.nn.Linear) or walk(child):
                return True
        return False
    return walk(layer)


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".") or a == "" or b == ""


def check_blocks(blocks: list, report) -> dict:
    """Each expected block call matched to its own region of the same kind at, inside or above its path."""
    free = list(report.regions)
    missing = []
    for kind, path in blocks:
        match = next((r for r in free if r.kind == kind and _related(r.module, path)), None)
        if match is None:
            missing.append(f"{kind} {path}")
        else:
            free.remove(match)
    counts = f"{len(report.by_kind('attention'))} attention + {len(report.by_kind('mlp'))} mlp regions"
    expected = (f"{sum(k == 'attention' for k, _ in blocks)} attention + "
                f"{sum(k == 'mlp' for k, _ in blocks)} mlp blocks")
    # a block the report names as not recognised (decision "unmatched", with its class) is reported, not invisible
    reported = [m for m in missing if any(f"{u.kind} {u.module}" == m for u in getattr(report, "unmatched", []))]
    invisible = [m for m in missing if m not in reported]
    # a block no graph captured while the report names Dynamo's graph breaks: the user is told why (the warning
    # and the report's graph-break lines), the block runs uncompiled
    broken = invisible if getattr(report, "graph_breaks", None) else []
    invisible = [m for m in invisible if m not in broken]
    if invisible:
        return _result("FAIL", f"{len(invisible)} block(s) without a region ({', '.join(invisible[:3])}); "
                               f"{counts} for {expected}")
    note = f"; {len(reported)} reported unmatched ({', '.join(reported[:3])})" if reported else ""
    if broken:
        note += (f"; {len(broken)} in graph-broken code ({', '.join(broken[:3])}), reported with the break: "
                 f"{report.graph_breaks[0][:80]}")
    return _result("pass", f"{counts} for {expected}{note}")


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def _eager_run(model, inputs: dict, train: bool, call=None) -> dict:
    """{"output": tensor, "grad <name>": tensor, ...} of one forward (+ backward of mean(out^2) when training)."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(train):
        torch.manual_seed(0)  # models that draw noise in forward (VITS) draw the same in every run
        out = first_float((model if call is None else call)(**inputs))
        if train:
            out.square().mean().backward()
    tensors = {"output": out.detach()}
    tensors.update({f"grad {n}": g for n, g in _grads(model).items()})
    model.zero_grad(set_to_none=True)
    return tensors


def _diffs(got: dict, expected: dict) -> dict:
    """Largest |difference| per tensor name; AOTAutograd gives unused parameters (a pooler, a router) zeros
    where eager leaves None."""
    diffs = {}
    for name in got.keys() | expected.keys():
        zero = (expected[name] if name in expected else got[name]) * 0
        diffs[name] = _max_diff(got.get(name, zero), expected.get(name, zero))
    return diffs


def compare(model, inputs: dict, options: dict, train: bool):
    """({tensor name: largest difference from eager}, report) for one compile of model: the output and, when
    training, every parameter's gradient."""
    import sparsify

    torch._dynamo.reset()
    reference = _eager_run(model, inputs, train)
    reports = []  # one per graph: a model with graph breaks compiles several (last_report() is the last one's)

    def collecting(gm, example_inputs):
        compiled_graph = sparsify.sparsify_backend(gm, example_inputs, options=options)
        reports.append(sparsify.last_report())
        return compiled_graph
    got = _eager_run(model, inputs, train, call=torch.compile(model, backend=collecting))
    return _diffs(got, reference), sparsify.Report.merged(reports) if reports else None


def fp32_rounding(model, inputs: dict, train: bool) -> dict:
    """{tensor name: |eager fp32 - eager fp64|}: how far fp32 rounding alone moves each tensor (RWKV's mixing
    gradients move 0.5% in eager itself: a rewrite that only reorders sums moves them as much)."""
    import copy

    reference = _eager_run(model, inputs, train)
    exact = _eager_run(copy.deepcopy(model).double(), {k: v.double() if torch.is_floating_point(v) else v
                                                         for k, v in inputs.items()}, train)
    return _diffs(reference, exact)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _result(status: str, detail: str = "") -> dict:
    return {"status": status, "detail": detail}


def _method_detail(report, kind: str, method: Optional[str]) -> str:
    if report is None:
        return "no graph compiled"
    if method is None:
        regions = report.regions
        return f"{len(report.rewritten)}/{len(regions)} regions rewritten"
    regions = report.by_kind(kind)
    took = [r for r in regions if r.decision == method]
    detail = f"{len(took)}/{len(regions)} {kind} regions {method}"
    left = next((r for r in regions if r.decision != method), None)
    return detail + (f"; e.g. {left.module}: {left.decision} ({left.reason})" if left is not None else "")


def run_check(model, inputs: dict, check: str, train: bool) -> tuple:
    """(result, report) of one of "dense", "spt", "routed" on model (routed prepares the model first)."""
    import sparsify

    kind, options, method = METHOD_OF_CHECK[check]
    try:
        if check == "routed":
            torch._dynamo.reset()
            model.train(train)
            sparsify.prepare(model, **inputs, options=options)
        diffs, report = compare(model, inputs, options, train)
    except Exception as exc:
        return _result("error", _first_line(exc)), None
    detail = _method_detail(report, kind, method)
    where = max(diffs, key=diffs.get)
    if diffs[where] <= ATOL:
        return _result("pass", detail), report
    if diffs[where] < ROUNDING_CHECK_BELOW:  # a small difference: is it more than fp32 rounding moves eager?
        try:
            rounding = fp32_rounding(model, inputs, train)
        except Exception:
            rounding = {}
        if rounding and all(d <= ATOL or d <= 4 * rounding.get(name, 0.0) for name, d in diffs.items()):
            return _result("pass", f"{detail}; max abs diff {diffs[where]:.3g} at {where}, within 4x of what fp32 "
                                   f"rounding moves eager there ({rounding.get(where, 0.0):.3g} from fp64)"), report
    return _result("FAIL", f"max abs diff {diffs[where]:.3g} at {where}; {detail}"), report


def run_type(model_type: str, time_box: float = 60.0, modes=MODES, impls=IMPLS, checks=CHECKS) -> dict:
    """Every (mode, impl, check) result of one model type: {"type", "seconds", "results": {"train/eager/dense": ...}}.
    Checks start in the order train/eager, train/sdpa, eval/eager, eval/sdpa; once time_box seconds have passed,
    the rest are "timeout". The routed check runs on its own model instance (prepare adds routers)."""
    start = time.time()
    results: dict = {}
    record = {"type": model_type, "results": results, "model_class": None}
    built: dict = {}
    for mode in modes:
        for impl in impls:
            for check in checks:
                key = f"{mode}/{impl}/{check}"
                if time.time() - start > time_box:
                    results[key] = _result("timeout", f"time box {time_box:.0f} s spent before this check")
                    continue
                results[key] = _run_one(model_type, mode, impl, check, built, results)
    record["results"] = {key: results[key] for key in sorted(results, key=_order(modes, impls, checks))}
    record["seconds"] = round(time.time() - start, 1)
    record["model_class"] = built.get("class")
    return record


def _order(modes, impls, checks):
    def position(key):
        mode, impl, check = key.split("/")
        return (modes.index(mode), impls.index(impl), checks.index(check) if check in checks else len(checks))
    return position


def _run_one(model_type, mode, impl, check, built: dict, results: dict) -> dict:
    fresh = check == "routed"  # prepare attaches routers: never on the model the other checks use
    slot = (impl, fresh)
    if slot not in built:
        try:
            model, config = build(model_type, impl)
            built["class"] = type(model).__name__
            inputs = make_inputs(model, config)
            with torch.no_grad():
                first_float(model(**inputs))  # the eager model itself runs on these inputs
        except Unsupported as exc:
            built[slot] = _result("unsupported-build", str(exc))
        except Exception as exc:
            built[slot] = _result("unsupported-build", f"eager forward: {_first_line(exc)}")
        else:
            built[slot] = (model, inputs)
    if isinstance(built[slot], dict):
        return dict(built[slot])
    model, inputs = built[slot]
    train = mode == "train"
    if check == "blocks":
        try:
            model.train(train)
            blocks = expected_blocks(model, inputs)
            result, report = run_check(model, inputs, "dense", train)
        except Exception as exc:
            return _result("error", _first_line(exc))
        if report is None:
            return _result("error", f"the dense compile failed: {result['detail']}")
        results[f"{mode}/{impl}/dense"] = result  # the dense check's result comes from this same compile
        return check_blocks(blocks, report)
    if check == "dense" and f"{mode}/{impl}/dense" in results:
        return results[f"{mode}/{impl}/dense"]
    result, _ = run_check(model, inputs, check, train)
    return result
