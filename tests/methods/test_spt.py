"""SPT sparse attention through the backend: state, exactness at keep=1, guards, FLOPs."""
import pytest
import torch

import sparsify
from families import assert_compiled_matches_eager, first_output, op_flops, tiny_inputs, tiny_model
from sparsify.ops import aux_loss as aux_loss_ops

SEQ = 16


def spt_options(**attention):
    base = {"method": "spt", "keep": 1.0, "min_seq": 1, "codebook_loss": 0.0}
    return {"attention": {**base, **attention}, "inner": "aot_eager"}



@pytest.mark.parametrize("family,impl", [("bert", "eager"), ("bert", "sdpa"), ("gpt2", "sdpa"),
                                         ("llama", "eager"), ("llama", "sdpa"), ("t5", "eager")])
def test_keep_one_reproduces_dense_attention(family, impl):
    model = tiny_model(family, impl).train()
    inputs = tiny_inputs(family, seq=SEQ)
    options = spt_options()
    sparsify.prepare(model, **inputs, options=options)
    report = assert_compiled_matches_eager(model, inputs, options)
    assert [r.decision for r in report.by_kind("attention")] == ["spt"] * len(report.by_kind("attention"))


def test_codebooks_are_parameters_and_survive_checkpoints_and_recompiles(tmp_path):
    model = tiny_model("llama", "sdpa")
    inputs = tiny_inputs("llama", seq=SEQ)
    options = spt_options(keep=0.5, codebook_loss=1e-2)
    sparsify.prepare(model, **inputs, options=options)
    names = [n for n, _ in model.named_parameters() if n.endswith("sparsify_pq_codebook")]
    assert names == ["layers.0.self_attn.sparsify_pq_codebook", "layers.1.self_attn.sparsify_pq_codebook"]
    codebook = model.get_parameter(names[0])
    assert codebook.shape == (1, 16, 8)  # head_dim 8 / subspace 8, 16 codewords, 8 dims

    # the codebook loss reaches the codebook through the compiled graph
    compiled = torch.compile(model, backend="sparsify", options=options)
    first_output(compiled(**inputs)).square().mean().backward()
    assert codebook.grad is not None and codebook.grad.abs().sum() > 0
    assert "layers.0.self_attn" in aux_loss_ops.AUX_LOSSES

    # recompiling and re-preparing never re-initialise it
    before = codebook.detach().clone()
    torch._dynamo.reset()
    sparsify.prepare(model, **inputs, options=options)
    torch.compile(model, backend="sparsify", options=options)(**inputs)
    assert torch.equal(model.get_parameter(names[0]), before)

    # checkpoint round trip: prepare a fresh model, load, same compiled outputs
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    fresh = tiny_model("llama", "sdpa", seed=123)
    sparsify.prepare(fresh, **inputs, options=options)
    assert not torch.equal(fresh.get_parameter(names[0]), before)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    assert torch.equal(fresh.get_parameter(names[0]), before)
    torch._dynamo.reset()
    with torch.no_grad():
        a = first_output(torch.compile(model, backend="sparsify", options=options)(**inputs))
        torch._dynamo.reset()
        b = first_output(torch.compile(fresh, backend="sparsify", options=options)(**inputs))
    torch.testing.assert_close(a, b)


def test_sparse_pattern_is_used_and_training_runs():
    """keep < 1 really drops keys (outputs move away from dense) and a few steps train."""
    model = tiny_model("bert", "sdpa").train()
    inputs = tiny_inputs("bert", seq=SEQ)
    options = spt_options(keep=0.25, codebook_loss=1e-2)
    sparsify.prepare(model, **inputs, options=options)
    with torch.no_grad():
        dense = first_output(model(**inputs))
    compiled = torch.compile(model, backend="sparsify", options=options)
    assert not torch.allclose(first_output(compiled(**inputs)), dense, atol=1e-3)
    assert all(r.facts["keep_keys"] == 4 for r in sparsify.last_report().by_kind("attention"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(8):
        loss = first_output(compiled(**inputs)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("attention,reason", [
    ({"subspace_dim": 3}, "head_dim 8 is not a multiple of subspace_dim 3"),
    ({"min_seq": 64}, "sequence length 16 is below min_seq=64"),
])
def test_guards_leave_region_dense_with_reason_or_raise_in_strict_mode(attention, reason):
    model = tiny_model("bert", "sdpa")
    inputs = tiny_inputs("bert", seq=SEQ)
    sparsify.prepare(model, **inputs, options=spt_options())
    options = spt_options(**attention)
    report = sparsify.explain(model, **inputs, options=options)
    assert [(r.decision, r.reason) for r in report.by_kind("attention")] == [("dense", reason)] * 2
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsify", options={**options, "strict": True})
    with pytest.raises(Exception, match="encoder.layer.0.attention.self"):
        compiled(**inputs)


def test_without_prepare_the_report_says_what_to_do():
    model = tiny_model("gpt2", "sdpa")
    report = sparsify.explain(model, **tiny_inputs("gpt2", seq=SEQ), options=spt_options())
    assert all(r.decision == "dense" and "sparsify.prepare" in r.reason for r in report.by_kind("attention"))


def test_flop_counter_sees_the_sparse_work():
    """At keep=1/8 the attention products count 1/8 of dense (QK^T and PV over L = n/8 keys)."""
    seq = 64
    inputs = tiny_inputs("bert", seq=seq, padded=False)

    def attention_flops(options):
        torch._dynamo.reset()
        model = tiny_model("bert", "sdpa").eval()
        if options["attention"]["method"] == "spt":
            sparsify.prepare(model, **inputs, options=options)
        return op_flops(model, inputs, options)

    dense = attention_flops({"attention": {"method": "dense"}, "inner": "eager"})
    sparse = attention_flops(spt_options(keep=0.125))
    # the dense rewrite's attention runs as SDPA (passes/lower.py): CPU's fused kernel, counted by the formula
    # sparsify registers for it (torch's own count for its CUDA kernels)
    dense_attention = dense["aten._scaled_dot_product_flash_attention_for_cpu"]
    assert dense_attention == 2 * (2 * 2 * 4 * seq * seq * (8 + 8))  # 2 layers x 2·B·H·n·n·(D+Dv)
    assert sparse["sparsify.spt_attention"] * 8 == dense_attention
    # the projections and MLPs (dense in both; the MLPs lowered to torch calls: passes/lower.py) count the same
    mlp = lambda counts: {k: v for k, v in counts.items() if k.startswith("aten.") and "attention" not in k}  # noqa: E731
    assert mlp(dense) == mlp(sparse) and sum(mlp(dense).values()) > 0


def test_dynamic_sequence_lengths_stay_sparse_and_exact():
    """After a length change Dynamo recompiles with a symbolic length: L = ceil(keep * n) becomes
    graph arithmetic, the region stays SPT, and keep=1 still equals eager at every length."""
    model = tiny_model("llama", "sdpa").eval()
    options = spt_options()
    sparsify.prepare(model, **tiny_inputs("llama", seq=SEQ), options=options)
    compiled = torch.compile(model, backend="sparsify", options=options)
    for seq in (SEQ, 20, 13):
        inputs = tiny_inputs("llama", seq=seq)
        with torch.no_grad():
            torch.testing.assert_close(first_output(compiled(**inputs)), first_output(model(**inputs)),
                                       atol=1e-5, rtol=0)
        assert {r.decision for r in sparsify.last_report().by_kind("attention")} == {"spt"}
    assert sparsify.last_report().by_kind("attention")[0].facts["keep_keys"] == "ceil(1*n_keys)"


def _pattern_mask(index, valid, lk):
    """The [B, H, Lq, Lk] bool mask allowing exactly the valid selected pairs (invalid slots go to
    a spare column, so they can never switch a selected key off)."""
    allowed = torch.zeros(*index.shape[:-1], lk + 1, dtype=torch.bool)
    allowed.scatter_(-1, index.long().masked_fill(~valid, lk), True)
    return allowed[..., :lk].contiguous()


@pytest.mark.slow
def test_sparse_attention_equals_flex_attention_with_the_same_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    B, H, n, D = 1, 2, 64, 16
    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
    codebook = torch.randn(2, 16, 8)
    index, valid = torch.ops.sparsify.pq_select(torch.ops.sparsify.pq_encode(q, codebook),
                                                torch.ops.sparsify.pq_encode(k, codebook), n // 8, True, None)
    out, _, _ = torch.ops.sparsify.spt_attention(q, k, v, index, valid, None, D ** -0.5, 0.0)
    allowed = _pattern_mask(index, valid, n)
    block_mask = flex.create_block_mask(lambda b, h, qi, kv: allowed[b, h, qi, kv], B, H, n, n,
                                        device="cpu", BLOCK_SIZE=16)
    reference = torch.compile(flex.flex_attention)(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "llama", pytest.param("t5", marks=pytest.mark.wide)])
def test_block_granularity_all_blocks_reproduces_dense(family):
    model = tiny_model(family, "sdpa").train()
    inputs = tiny_inputs(family, seq=32)
    options = spt_options(granularity="block", block_size=16)
    sparsify.prepare(model, **inputs, options=options)
    report = assert_compiled_matches_eager(model, inputs, options)
    assert {r.decision for r in report.by_kind("attention")} == {"spt"}
    assert {r.facts["keep_blocks"] for r in report.by_kind("attention")} == {2}


def test_block_granularity_keeps_fewer_blocks():
    model = tiny_model("gpt2", "sdpa").train()
    inputs = tiny_inputs("gpt2", seq=64)
    options = spt_options(granularity="block", block_size=16, keep=0.5, codebook_loss=1e-2)
    sparsify.prepare(model, **inputs, options=options)
    compiled = torch.compile(model, backend="sparsify", options=options)
    out = first_output(compiled(**inputs))
    rows = sparsify.last_report().by_kind("attention")
    assert [(r.decision, r.facts["keep_blocks"]) for r in rows] == [("spt", 2)] * 2
    out.square().mean().backward()
    assert model.get_parameter("h.0.attn.sparsify_pq_codebook").grad is not None
    # the block-sparse ops ran (their FLOP formulas count them), and no dense attention op did
    flops = sparsify.count_flops(model, **inputs, options=options)
    assert flops.get("sparsify.block_sparse_attention", 0) > 0 and "sparsify.attention" not in flops, flops
    # keeping half the key blocks changes the output (a silent dense fallback would not)
    with torch.no_grad():
        dense = first_output(torch.compile(model, backend="sparsify",
                                           options={**options, "attention": "dense"})(**inputs))
    assert not torch.allclose(out.detach(), dense, atol=1e-4)


def test_attention_module_compiled_as_the_root_gets_its_codebook():
    """A root's own hooks run outside the traced frame: its codebook is tagged from its q projection, so
    compiling just the attention module still rewrites it (and keep=1 still equals eager)."""
    model = tiny_model("bert", "sdpa").eval()
    attention = model.encoder.layer[0].attention.self
    hidden = torch.randn(2, SEQ, model.config.hidden_size)
    options = spt_options()
    sparsify.prepare(attention, hidden, options=options)
    assert attention.sparsify_pq_codebook.shape == (1, 16, 8)
    with torch.no_grad():
        out = first_output(torch.compile(attention, backend="sparsify", options=options)(hidden))
        torch.testing.assert_close(out, first_output(attention(hidden)), atol=1e-5, rtol=0)
    report = sparsify.last_report().by_kind("attention")
    assert [(r.decision, r.facts["q_projection"], r.facts["score"]) for r in report] == [
        ("spt", "query", "codes(1 subspaces)")]
