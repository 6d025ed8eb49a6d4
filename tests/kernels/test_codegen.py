"""Tests for sparsify.codegen: generated Triton up-projection kernels.

On CPU the kernels run in Triton's interpreter. Triton reads TRITON_INTERPRET when a
kernel is *decorated*; sparsify.codegen builds kernels lazily, keys them on the mode,
and uses only Triton builtins (see sparsify/codegen/templates.py), and the interpreter
tests set the variable themselves (fixture below), so the results do not depend on
which tests ran, or imported triton, earlier in the process.
"""

import os

import torch

# Before sparsify.codegen builds any kernel. Only without CUDA: on a GPU machine a
# process-wide TRITON_INTERPRET=1 would also turn every other test's Triton kernels
# (Inductor's included) into interpreted ones; there the fixture sets it per test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
import itertools
import subprocess
import sys

import pytest
from paths import REPO  # noqa: E402
import torch.nn.functional as F

from sparsify.codegen import (
    ACTIVATIONS,
    UpProjectionSpec,
    cache_dir,
    cache_info,
    clear_cache,
    get_kernel,
    kernel_key,
    kernel_source,
    up_projection,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# Odd sizes, not multiples of any block size, so every mask is exercised.
T, K, N = 37, 48, 40


# generated kernels go to a temporary cache directory (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernel_cache_dir")


def _act(name, v):
    if name == "gelu":
        return F.gelu(v, approximate="none")
    if name == "gelu_tanh":
        return F.gelu(v, approximate="tanh")
    if name == "relu":
        return F.relu(v)
    if name == "silu":
        return F.silu(v)
    if name == "quick_gelu":
        return v * torch.sigmoid(1.702 * v)
    if name == "relu2":
        return F.relu(v) ** 2
    raise AssertionError(name)


def reference(x, w, b, activation, w_gate=None, b_gate=None):
    """fp32 torch reference computed from the same (already rounded) inputs."""
    f = lambda t: None if t is None else t.float()  # noqa: E731
    x, w, b, wg, bg = f(x), f(w), f(b), f(w_gate), f(b_gate)
    up = F.linear(x, w, b)
    if wg is None:
        return _act(activation, up)
    return _act(activation, F.linear(x, wg, bg)) * up


def make_inputs(dtype, gated, bias, device="cpu", t=T, k=K, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    scale = k ** -0.5  # keep pre-activations O(1) so every activation regime is hit
    x = r(t, k)
    w = r(n, k) * scale
    b = r(n) if bias else None
    wg = r(n, k) * scale if gated else None
    bg = r(n) if (gated and bias) else None
    cast = lambda v: None if v is None else v.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(wg), cast(bg)


def assert_matches(y, ref, dtype):
    assert y.shape == ref.shape and y.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    else:  # 16-bit output rounding: tolerance relative to the result's magnitude
        tol = 1e-2 * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(y.float(), ref, atol=tol, rtol=1e-2)


# --- numerics under the interpreter -------------------------------------------------------

@needs_triton
@pytest.mark.parametrize(
    "activation,gated,bias,dtype",
    list(itertools.product(ACTIVATIONS, (False, True), (True, False), (torch.float32, torch.float16))),
)
def test_matches_torch(interpreter, activation, gated, bias, dtype):
    x, w, b, wg, bg = make_inputs(dtype, gated, bias)
    y = up_projection(x, w, b, activation=activation, w_gate=wg, b_gate=bg)
    assert y.dtype == dtype
    assert_matches(y, reference(x, w, b, activation, wg, bg), dtype)


@needs_triton
@pytest.mark.parametrize("gated", (False, True))
def test_noncontiguous_operands(interpreter, gated):
    # A GPT-2 style Conv1D stores its weight as [K, N]; the Linear-layout view is .t().
    x, w, b, wg, bg = make_inputs(torch.float32, gated, True)
    w_t = w.t().contiguous().t()
    assert not w_t.is_contiguous()
    wg_t = wg.t().contiguous().t() if gated else None
    # x as a column slice of a wider buffer: row stride != K
    x_wide = torch.zeros(T, K + 5)
    x_wide[:, 2:K + 2] = x
    x_view = x_wide[:, 2:K + 2]
    assert not x_view.is_contiguous()
    y = up_projection(x_view, w_t, b, activation="silu", w_gate=wg_t, b_gate=bg)
    assert_matches(y, reference(x, w, b, "silu", wg, bg), torch.float32)


@needs_triton
def test_decode_sized_and_empty(interpreter):
    x, w, b, _, _ = make_inputs(torch.float32, False, True, t=1)
    assert_matches(up_projection(x, w, b, "gelu"), reference(x, w, b, "gelu"), torch.float32)
    y = up_projection(torch.zeros(0, K), w, b, "gelu")
    assert y.shape == (0, N)


# --- generation and caching ----------------------------------------------------------------

@needs_triton
def test_cache_serves_same_kernel(interpreter):
    clear_cache()
    spec = UpProjectionSpec(activation="relu", gated=True, has_bias=False, dtype=torch.float32)
    k1 = get_kernel(spec)
    assert cache_info().generated == 1 and cache_info().misses == 1
    k2 = get_kernel(UpProjectionSpec(activation="relu", gated=True, has_bias=False, dtype=torch.float32))
    assert k2 is k1
    info = cache_info()
    assert (info.hits, info.generated, info.entries) == (1, 1, 1)
    # the source is on disk under its key and is what kernel_source() returns
    assert k1.path == cache_dir() / f"{kernel_key(spec)}.py"
    assert k1.path.read_text() == kernel_source(spec) == k1.source

    # a launch through up_projection reuses the cached kernel
    x, w, _, wg, _ = make_inputs(torch.float32, True, False)
    up_projection(x, w, None, "relu", w_gate=wg)
    up_projection(x, w, None, "relu", w_gate=wg)
    info = cache_info()
    assert (info.hits, info.generated, info.entries) == (3, 1, 1)

    # a different spec: a different key, source and kernel
    other = UpProjectionSpec(activation="relu", gated=True, has_bias=True, dtype=torch.float32)
    assert kernel_key(other) != kernel_key(spec)
    assert kernel_source(other) != kernel_source(spec)
    assert get_kernel(other) is not k1
    assert cache_info().generated == 2


@needs_triton
def test_cache_is_keyed_on_interpreter_mode(monkeypatch):
    spec = UpProjectionSpec(activation="gelu", dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interp = get_kernel(spec)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    jitted = get_kernel(spec)  # decorating needs no GPU
    assert interp.interpret and not jitted.interpret and interp is not jitted
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            up_projection(torch.randn(2, K), torch.randn(N, K), None, "gelu")


def test_spec_is_hashable_and_keys_are_stable():
    a = UpProjectionSpec(activation="silu", gated=True, has_bias=False, dtype=torch.float16)
    b = UpProjectionSpec(activation="silu", gated=True, has_bias=False, dtype=torch.float16)
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert kernel_key(a) == kernel_key(b) and len(kernel_key(a)) == 64
    keys = {
        kernel_key(UpProjectionSpec(act, g, hb, dt))
        for act, g, hb, dt in itertools.product(
            ACTIVATIONS, (False, True), (False, True), (torch.float16, torch.bfloat16, torch.float32)
        )
    }
    assert len(keys) == len(ACTIVATIONS) * 2 * 2 * 3


def test_source_is_specialised_by_spec():
    src = {a: kernel_source(UpProjectionSpec(activation=a)) for a in ACTIVATIONS}
    assert "0.044715" in src["gelu_tanh"] and "0.044715" not in src["relu"]
    assert "erf" in src["gelu"] and "erf" not in src["gelu_tanh"]
    assert "tl.maximum" in src["relu"] and "tl.exp" in src["silu"]
    # exactly one epilogue per kernel, chosen at generation time: no runtime branch
    markers = {"gelu": "tl.math.erf", "gelu_tanh": "0.044715", "relu": "tl.maximum", "silu": "tl.exp(-acc",
               "quick_gelu": "1.702", "relu2": "tl.where(acc > 0.0"}
    for a, s in src.items():
        assert [m for m in markers.values() if m in s] == [markers[a]]
        assert not any(line.strip().startswith(("if ", "elif ")) for line in s.splitlines())

    plain = kernel_source(UpProjectionSpec("gelu", gated=False, has_bias=False))
    assert "b_ptr" not in plain and "acc_g" not in plain and "wg_ptr" not in plain
    gated_bias = kernel_source(UpProjectionSpec("gelu", gated=True, has_bias=True))
    assert "bg_ptr" in gated_bias and "acc_g" in gated_bias
    assert gated_bias.count("tl.load(x_ptrs") == 1  # x tile is loaded once for both GEMMs
    # fp32 asks for IEEE products; 16-bit dtypes do not pass a precision
    assert 'input_precision="ieee"' in kernel_source(UpProjectionSpec("relu", dtype=torch.float32))
    assert "input_precision" not in kernel_source(UpProjectionSpec("relu", dtype=torch.float16))
    compile(gated_bias, "<generated>", "exec")  # valid Python


def test_codegen_import_does_not_import_triton():
    # The parent package imports torch._dynamo, which itself imports triton, so load
    # sparsify.codegen under a bare stand-in for `sparsify` to test this package alone.
    root = REPO
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('sparsify')\n"
        f"pkg.__path__ = [{os.path.join(root, 'sparsify')!r}]\n"
        "sys.modules['sparsify'] = pkg\n"
        "import sparsify.codegen\n"
        "assert 'triton' not in sys.modules, 'sparsify.codegen imported triton eagerly'\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, timeout=120)


@needs_triton
def test_interpreter_works_when_triton_was_imported_first(tmp_path):
    """triton.language imported (and a kernel defined) before TRITON_INTERPRET=1 is set."""
    script = tmp_path / "late_interpret.py"
    script.write_text(
        "import os, torch, triton, triton.language as tl\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from sparsify.codegen import up_projection\n"
        "x, w, wg = torch.randn(5, 20), torch.randn(18, 20), torch.randn(18, 20)\n"
        "y = up_projection(x, w, None, 'gelu_tanh', w_gate=wg)\n"
        "ref = torch.nn.functional.gelu(x @ wg.T, approximate='tanh') * (x @ w.T)\n"
        "torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = REPO
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    subprocess.run([sys.executable, str(script)], check=True, cwd=root, env=env, timeout=120)


@needs_triton
@pytest.mark.parametrize(
    "spec",
    [
        UpProjectionSpec("gelu_tanh", gated=True, has_bias=True, dtype=torch.float16),
        UpProjectionSpec("gelu", gated=False, has_bias=True, dtype=torch.float32),
    ],
    ids=["gated-fp16", "plain-fp32"],
)
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.wide  # the default suite compiles every family, with ptxas figures, in tests/kernels/test_sm90_all.py
def test_compiles_for_sm90_without_a_gpu(monkeypatch, spec):
    """The real (non-interpreter) frontend accepts the generated source: Triton compiles
    it ahead of time for an H100 target, no GPU needed. Catches what the interpreter
    would let through (e.g. dtype rules of tl.dot)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import triton
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fn = get_kernel(spec).fn
    ptr = {torch.float16: "*fp16", torch.float32: "*fp32"}[spec.dtype]
    sig = {
        a: "constexpr" if a.startswith("BLOCK") else ptr if a.endswith("_ptr") else "i32"
        for a in fn.arg_names
    }
    src = ASTSource(fn, sig, constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32})
    try:
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    except Exception as e:  # noqa: BLE001 -- only a missing CUDA toolchain is tolerated
        if "ptxas" in str(e).lower():
            pytest.skip(f"no usable ptxas: {e}")
        raise
    assert "ttgir" in out.asm


# --- input validation ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs",
    [
        dict(activation="tanh"),
        dict(activation="gelu", gated=1),
        dict(activation="gelu", dtype=torch.float64),
    ],
)
def test_spec_rejects_bad_fields(kwargs):
    with pytest.raises(ValueError):
        UpProjectionSpec(**kwargs)


def test_up_projection_rejects_bad_inputs():
    x = torch.randn(T, K)
    w = torch.randn(N, K)
    b = torch.randn(N)
    cases = [
        (dict(x2d=x, w=w, b=b, activation="swish"), "activation"),
        (dict(x2d=x.double(), w=w.double(), b=None, activation="gelu"), "dtype"),
        (dict(x2d=x.int(), w=w.int(), b=None, activation="gelu"), "dtype"),
        (dict(x2d=x, w=w.half(), b=None, activation="gelu"), "dtype"),
        (dict(x2d=x, w=torch.randn(N, K + 1), b=None, activation="gelu"), "shape"),
        (dict(x2d=x, w=w, b=torch.randn(N + 1), activation="gelu"), "shape"),
        (dict(x2d=x[None], w=w, b=None, activation="gelu"), "2-D"),
        (dict(x2d=x, w=w, b=b, activation="gelu", w_gate=torch.randn(N + 1, K), b_gate=b), "w_gate"),
        (dict(x2d=x, w=w, b=b, activation="gelu", w_gate=w), "both biases"),
        (dict(x2d=x, w=w, b=None, activation="gelu", b_gate=b), "b_gate"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            up_projection(**kwargs)


def test_get_kernel_rejects_non_spec():
    with pytest.raises(ValueError):
        get_kernel("gelu")
    with pytest.raises(ValueError):
        kernel_source(("gelu", False))


# --- real GPU ------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("gated", (False, True))
def test_cuda_matches_torch(monkeypatch, dtype, gated):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled kernels, not the interpreter
    for activation in ACTIVATIONS:
        x, w, b, wg, bg = make_inputs(dtype, gated, True, device="cuda", t=300, k=520, n=1000)
        w = w.t().contiguous().t()  # Conv1D-style transposed view
        y = up_projection(x, w, b, activation=activation, w_gate=wg, b_gate=bg)
        assert y.device.type == "cuda" and y.dtype == dtype
        ref = reference(x, w, b, activation, wg, bg)
        tol = (2e-2 if dtype == torch.bfloat16 else 1e-2) * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(y.float(), ref, atol=tol, rtol=2e-2)
