"""Tiny stock transformers models, built from configs (no weights, no hub), one per family."""
from __future__ import annotations

import torch
import transformers

FAMILIES = ("bert", "roberta", "gpt2", "llama", "opt", "t5")
SEQ = 8
VOCAB = 96


def tiny_config(family: str, attn_implementation: str = "eager"):
    common = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                  vocab_size=VOCAB, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    if family == "bert":
        cfg = transformers.BertConfig(**common)
    elif family == "roberta":
        cfg = transformers.RobertaConfig(**common, pad_token_id=1)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=VOCAB, attn_pdrop=0.0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    elif family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=64, num_hidden_layers=2, vocab_size=VOCAB,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
    elif family == "opt":
        cfg = transformers.OPTConfig(hidden_size=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=2,
                                     vocab_size=VOCAB, word_embed_proj_dim=32, dropout=0.0,
                                     attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    elif family == "t5":
        cfg = transformers.T5Config(d_model=32, num_heads=4, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
                                    vocab_size=VOCAB, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn_implementation
    return cfg


def tiny_model(family: str, attn_implementation: str = "eager", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tiny_config(family, attn_implementation)
    return transformers.AutoModel.from_config(cfg, attn_implementation=attn_implementation).float()


def tiny_inputs(family: str, padded: bool = True, batch: int = 2, seq: int = SEQ, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        mask[-1, seq - 3:] = 0  # right padding on the last row
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        kwargs["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, seq - 2), generator=g)
    return kwargs


def expected_blocks(family: str) -> tuple[int, int]:
    """(attention, mlp) blocks the model has: per layer one of each; T5 decoders add cross-attention."""
    if family == "t5":
        return 2 * 2 + 2, 2 * 2  # encoder self x2, decoder self x2 + cross x2; 4 MLPs
    return 2, 2


def first_output(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def grads_of(model) -> dict:
    """Parameter name -> a copy of its gradient, for the parameters that have one."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_compiled_matches_eager(model, inputs: dict, options: dict, atol: float = 1e-5):
    """torch.compile(model, backend="sparsify", options) gives eager's output and every gradient eager computes,
    within atol (loss: mean square of the first output). Returns the compiled report (sparsify.last_report())."""
    import sparsify

    reference = first_output(model(**inputs))
    reference.square().mean().backward()
    reference_grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    out = first_output(torch.compile(model, backend="sparsify", options=options)(**inputs))
    report = sparsify.last_report()
    torch.testing.assert_close(out, reference, atol=atol, rtol=0)
    out.square().mean().backward()
    grads = grads_of(model)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=atol, rtol=0, msg=name)
    return report


def op_flops(model, inputs: dict, options: dict) -> dict:
    """FLOPs per op name of one forward of the graph the sparsify passes produce for model(**inputs)."""
    import sparsify

    return sparsify.count_flops(model, **inputs, options=options)
