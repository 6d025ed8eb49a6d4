"""What the backend did is never hidden (issue 8, items 5, 10, 12, 13): recorded auxiliary losses are the real values
under Inductor, a requested sparse method that some regions do not get is warned about once per graph (strict
raises), min_seq is decided per length class whatever the order of calls, TORCH_LOGS prints each line once."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import sparsify
from families import tiny_inputs, tiny_model
from sparsify.ops.aux_loss import AUX_LOSSES
from paths import REPO, TESTS  # noqa: E402

SPT_CODES = {"attention": {"method": "spt", "min_seq": 0, "keep": 0.5}}


@pytest.mark.slow
def test_recorded_codebook_loss_under_inductor_is_the_true_value():
    """Item 5: the value sparsify::aux_loss records must not share a buffer the compiled graph reuses."""
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", seq=16)
    sparsify.prepare(model, **inputs, options=SPT_CODES)
    recorded = {}
    for inner in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        AUX_LOSSES.clear()
        out = torch.compile(model, backend="sparsify", options={**SPT_CODES, "inner": inner})(**inputs)
        out.last_hidden_state.sum().backward()  # the backward reuses the forward's buffers under Inductor
        recorded[inner] = {name: value.item() for name, value in AUX_LOSSES.items()}
        assert sparsify.aux_losses() == recorded[inner]  # the public reader returns the same values
    assert set(recorded["inductor"]) == {"layers.0.self_attn", "layers.1.self_attn"}
    for name, value in recorded["aot_eager"].items():
        assert recorded["inductor"][name] == pytest.approx(value, rel=1e-4), name


def test_requested_method_left_dense_warns_once_with_count_and_reason():
    """Item 10: SPT codes requested without prepare: one warning for the graph, naming the count and the reason."""
    model = tiny_model("bert")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, backend="sparsify", options={**SPT_CODES, "inner": "aot_eager"})(**tiny_inputs("bert"))
    ours = [str(w.message) for w in caught if "was requested" in str(w.message)]
    assert len(ours) == 1, ours
    assert "2 of 2 attention regions" in ours[0] and "call sparsify.prepare" in ours[0]
    # strict turns the same fallback into an error naming the module
    torch._dynamo.reset()
    with pytest.raises(Exception, match="encoder.layer.0.attention.self"):
        torch.compile(model, backend="sparsify",
                      options={**SPT_CODES, "inner": "aot_eager", "strict": True})(**tiny_inputs("bert"))


def test_min_seq_fallback_warns_and_dense_default_does_not():
    model = tiny_model("llama")
    options = {"attention": {"method": "spt", "score": "exact", "min_seq": 64}, "inner": "aot_eager"}
    with pytest.warns(UserWarning, match="below min_seq=64"):
        torch.compile(model, backend="sparsify", options=options)(**tiny_inputs("llama"))
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, backend="sparsify", options={"inner": "aot_eager"})(**tiny_inputs("llama"))
    assert not [w for w in caught if "was requested" in str(w.message)]


def test_explain_prints_instead_of_warning(capsys):
    model = tiny_model("bert")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = sparsify.explain(model, **tiny_inputs("bert"), options=SPT_CODES)
    assert not [w for w in caught if "was requested" in str(w.message)]
    assert "call sparsify.prepare" in capsys.readouterr().out
    assert {r.decision for r in report.by_kind("attention")} == {"dense"}


def test_torch_logs_prints_each_line_once(tmp_path):
    """Item 13: TORCH_LOGS="sparsify" logs one line per region, not two."""
    script = (
        "import sys, torch; sys.path.insert(0, %r)\n"
        "from families import tiny_model, tiny_inputs\n"
        "import sparsify\n"
        "m = tiny_model('bert')\n"
        "torch.compile(m, backend='sparsify', options={'inner': 'eager'})(**tiny_inputs('bert'))\n"
    ) % TESTS
    env = {**os.environ, "TORCH_LOGS": "sparsify"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "attention encoder.layer.0.attention.self" in line]
    assert len(lines) == 1, result.stderr[-2000:]


@pytest.mark.parametrize("order", [(8, 16), (16, 8)])
def test_min_seq_under_dynamic_shapes_is_the_same_whatever_the_call_order(order):
    """Item 12: min_seq is a symbolic guard, so each length gets the plan of its own side of min_seq."""
    model = tiny_model("llama")
    options = {"attention": {"method": "spt", "score": "exact", "keep": 1.0, "min_seq": 12}, "inner": "aot_eager"}
    compiled = torch.compile(model, backend="sparsify", dynamic=True, options=options)
    decisions = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seq in order:
            inputs = tiny_inputs("llama", seq=seq)
            out = compiled(**inputs).last_hidden_state
            decisions[seq] = {r.decision for r in sparsify.last_report().by_kind("attention")}
            with torch.no_grad():
                torch.testing.assert_close(out, model(**inputs).last_hidden_state, atol=1e-5, rtol=0)
    assert decisions == {8: {"dense"}, 16: {"spt"}}


class _SineMLP(torch.nn.Module):
    """A block named like an MLP whose activation no matcher knows (as Apertus' xIELU was)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(torch.sin(self.up(x)) * torch.cumsum(self.up(x), -1))


class _KeywordLinearMLP(torch.nn.Module):
    """I-BERT's spelling: F.linear(x, weight=..., bias=...). The matchers must read keywords too."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        hidden = torch.nn.functional.linear(x, weight=self.up.weight, bias=self.up.bias)
        return torch.nn.functional.linear(torch.relu(hidden), weight=self.down.weight, bias=self.down.bias)


class _Blocks(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(x)


def test_block_named_like_an_mlp_without_a_region_is_reported_and_warned():
    """A block the matchers do not recognise runs as written: when its kind's method asks for sparsity, say so
    (report row "unmatched", one warning naming it; strict raises); the dense default says nothing."""
    model, x = _Blocks(_SineMLP()), torch.randn(2, 8, 16)
    report = sparsify.explain(model, x, options={"mlp": "routed"})
    assert [(r.kind, r.module, r.decision) for r in report.unmatched] == [("mlp", "mlp", "unmatched")]
    assert "_SineMLP" in report.table() and "1 block(s) not recognised" in report.table()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="sparsify", options={"mlp": "routed", "inner": "aot_eager"})(x)
    ours = [str(w.message) for w in caught if "matched no mlp pattern" in str(w.message)]
    assert len(ours) == 1 and "mlp (_SineMLP)" in ours[0], ours
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    for options, raises in (({"mlp": "routed", "strict": True}, True), ({}, False)):
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = torch.compile(model, backend="sparsify", options={**options, "inner": "aot_eager"})
            if raises:
                with pytest.raises(Exception, match=r"strict.*mlp \(_SineMLP\)"):
                    compiled(x)
            else:
                compiled(x)
                assert not [w for w in caught if "matched no" in str(w.message)]
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:  # an excluded module is the user's choice: no warning
        warnings.simplefilter("always")
        torch.compile(model, backend="sparsify", options={"mlp": "routed", "exclude": "mlp", "inner": "aot_eager"})(x)
    assert not [w for w in caught if "matched no" in str(w.message)]


def test_linear_called_with_keyword_operands_is_matched():
    model, x = _Blocks(_KeywordLinearMLP()), torch.randn(2, 8, 16)
    report = sparsify.explain(model, x)
    assert [(r.kind, r.module) for r in report.regions] == [("mlp", "mlp")] and not report.unmatched
    compiled = torch.compile(model, backend="sparsify", options={"inner": "aot_eager"})
    torch.testing.assert_close(compiled(x), model(x))


class _BrokenMLP(torch.nn.Module):
    """An MLP whose forward Dynamo cannot capture whole (a data-dependent branch, as I-BERT's quantizers have)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.up(x))
        if h.sum() > 0:  # data-dependent: Dynamo breaks the graph here
            h = h * 1.0
        return self.down(h)


def test_graph_break_is_reported_and_warned_once():
    """Code around a graph break runs uncompiled, so a block in it cannot be rewritten: the warning names Dynamo's
    reason once (not per graph, not per call), and the report of the graphs lists it."""
    from sparsify import debug
    debug._warned_breaks.clear()  # once per process: another test may have met the same reason
    model, x = _Blocks(_BrokenMLP()), torch.randn(2, 8, 16)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="sparsify", options={"mlp": "routed", "inner": "aot_eager"})
        out = compiled(x)
        compiled(x)
    ours = [str(w.message) for w in caught if "Dynamo broke the graph" in str(w.message)]
    assert len(ours) == 1 and "Data-dependent" in ours[0], ours
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    report = sparsify.last_report(graphs=3)
    assert report.graph_breaks and "Data-dependent" in report.graph_breaks[0]
    assert "graph break: Data-dependent" in report.table()
