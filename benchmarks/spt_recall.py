"""Selection recall of SPT's PQ top-L against the exact top-L of q.k^T, on real q/k of all-MiniLM-L6-v2.

    python benchmarks/spt_recall.py                       # n in {256, 512}, keep in {1/8, 1/4}
    python benchmarks/spt_recall.py --n 128 --keeps 0.25  # smaller

Text: sparsify_examples.models.sample_texts() (16 short English sentences), tokenised without special tokens,
concatenated (sentence order fixed per sequence) and repeated until the sequence holds n tokens including
[CLS] and [SEP]; no padding. A batch of 2 sequences per setting (two sentence orders). Two settings:
  in-sample  codebooks fit on all 16 sentences (a third order, n=256), evaluated on all 16 sentences
  held-out   codebooks fit on sentences 0-7, evaluated on sentences 8-15 (no sentence in common)
Only 16 sentences exist, so texts of 256-512 tokens repeat them (2-4 times in-sample, 4-8 times held-out):
repeated sentences give repeated keys, which is easier than natural long text. Say so when quoting.

Codebooks: sparsify.prepare(model, **calibration_inputs, options={"attention": {"method": "spt",
"keep": ..., "min_seq": 1}}), which fits one [head_dim/8, 16, 8] codebook per attention module by k-means on
the q/k it records (no codebook-loss training has happened: this is the codebook a fine-tune starts from).
q/k: forward hooks on each layer's attention.self.query / .key Linear (BERT has no RoPE and scales the
scores, not q, so these outputs, split into heads, are exactly the q and k the attention uses; the
recall ranking is invariant to the score scale).

Per layer (6) and keep fraction, L = ceil(keep * n) keys per query, non-causal, all keys valid:
  recall_pq         sparsify.ops.key_select.selection_recall of pq_encode + pq_select (the SPT op path)
  recall_pq_randcb  the same with a random codebook (Gaussian with the per-subspace mean/std of the data)
  recall_random     a uniformly random set of L keys per query (expected L/n): the chance baseline
  recall_pq_random_ties  expected recall of the same PQ scores if ties at the cut were broken uniformly at random
                    (pq_select breaks them by the lower key index; MiniLM's head_dim 32 gives M = 4 subspaces,
                    so the score has 5 levels and the cut usually falls inside a large tie);
                    keys_at_or_above_cut_per_slot = mean (#keys scoring >= the L-th score) / L
  mass_*            softmax attention mass (scale 1/sqrt(d)) on the selected keys, mean over query rows;
                    mass_exact is the exact top-L (the most any L keys can hold)
Results: benchmarks/results/spt_recall_cpu.json / .md (the stem is the device slug).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

import sparsify  # noqa: E402
from sparsify.ops.key_select import selection_recall  # noqa: E402
from sparsify.methods.spt import CODEBOOK  # noqa: E402


def make_ids(tokenizer, sentences, n, order_seed):
    """[CLS] + tokens of the sentences (in a seeded order), repeated to n - 2 tokens + [SEP]."""
    g = torch.Generator().manual_seed(order_seed)
    order = torch.randperm(len(sentences), generator=g).tolist() if order_seed else list(range(len(sentences)))
    tokens = []
    for i in order:
        tokens += tokenizer(sentences[i], add_special_tokens=False)["input_ids"]
    body = (tokens * math.ceil((n - 2) / len(tokens)))[: n - 2]
    return [tokenizer.cls_token_id] + body + [tokenizer.sep_token_id], len(tokens)


def batch(tokenizer, sentences, n, seeds):
    rows, unique = zip(*(make_ids(tokenizer, sentences, n, s) for s in seeds))
    ids = torch.tensor(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, unique[0]


def attention_modules(model):
    return [layer.attention.self for layer in model.encoder.layer]


def record_qk(model, inputs):
    """Run the model once (eager) and return [(q, k)] per layer, each [B, H, n, d]."""
    captured = {}
    handles = []
    for i, att in enumerate(attention_modules(model)):
        heads = att.num_attention_heads
        for name in ("query", "key"):
            def hook(mod, args, out, i=i, name=name, heads=heads):
                b, n, hd = out.shape
                captured[(i, name)] = out.detach().view(b, n, heads, hd // heads).transpose(1, 2).contiguous()
            handles.append(getattr(att, name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return [(captured[(i, "query")], captured[(i, "key")]) for i in range(len(attention_modules(model)))]


def attention_mass(q, k, index, valid, scale):
    with torch.no_grad():
        p = torch.softmax(torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale, dim=-1)
        picked = p.gather(-1, index.long()) * valid
        return picked.sum(-1).mean().item()


def exact_topl(q, k, keep):
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double())
    idx = s.topk(keep, dim=-1).indices
    return idx, torch.ones_like(idx, dtype=torch.bool)


def random_selection(shape, n, keep, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(*shape, n, generator=g).topk(keep, dim=-1).indices.sort(-1).values
    return idx.to(torch.int32), torch.ones_like(idx, dtype=torch.bool)


def tie_analysis(q, k, qc, kc, keep):
    """pq_select breaks ties in the code-match score by the lower key index. With M = head_dim / 8 subspaces the
    score has only M + 1 levels, so the cut at the L-th key usually falls inside a large tie. Returns
    (expected recall with ties broken uniformly at random instead, mean (#keys scoring >= the cut) / L)."""
    with torch.no_grad():
        score = torch.zeros(*qc.shape[:3], kc.shape[2], dtype=torch.int16)
        for m in range(qc.shape[-1]):
            score += qc[..., :, None, m] == kc[..., None, :, m]
        cut = score.topk(keep, dim=-1).values[..., -1:]
        above, at = score > cut, score == cut
        top = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()).topk(keep, dim=-1).indices
        in_top = torch.zeros_like(above).scatter_(-1, top, True)
        n_above = above.sum(-1).double()
        frac = (keep - n_above) / at.sum(-1).double()          # share of the tied keys that get a slot
        hits = (above & in_top).sum(-1).double() + frac * (at & in_top).sum(-1).double()
        return (hits / keep).mean().item(), ((n_above + at.sum(-1)) / keep).mean().item()


def random_codebook_like(q, k, codebook, seed):
    """A Gaussian codebook with the per-subspace mean/std of the q/k sub-vectors."""
    m, e, dc = codebook.shape
    sub = torch.cat([q.reshape(-1, m, dc), k.reshape(-1, m, dc)])
    mean, std = sub.mean(0), sub.std(0)  # [M, dc]
    g = torch.Generator().manual_seed(seed)
    return mean[:, None, :] + std[:, None, :] * torch.randn(m, e, dc, generator=g)


def evaluate(model, inputs, keeps, seed):
    per_layer = record_qk(model, inputs)
    codebooks = dict((n_, p) for n_, p in model.named_parameters() if n_.endswith(CODEBOOK))
    rows = []
    for li, (att, (q, k)) in enumerate(zip(attention_modules(model), per_layer)):
        cb = getattr(att, CODEBOOK, None)
        if cb is None:
            raise RuntimeError(f"layer {li}: no {CODEBOOK} after sparsify.prepare (found {list(codebooks)})")
        cb = cb.detach()
        n, d = k.shape[2], q.shape[-1]
        scale = 1.0 / math.sqrt(d)
        rcb = random_codebook_like(q, k, cb, seed + li)
        qc, kc = torch.ops.sparsify.pq_encode(q, cb), torch.ops.sparsify.pq_encode(k, cb)
        rqc, rkc = torch.ops.sparsify.pq_encode(q, rcb), torch.ops.sparsify.pq_encode(k, rcb)
        used = torch.cat([qc, kc], dim=2)  # codeword usage: how many of E codewords appear, per subspace
        usage = statistics.mean(len(torch.unique(used[..., m])) for m in range(used.shape[-1]))
        for keep_frac in keeps:
            keep = max(1, min(n, math.ceil(keep_frac * n)))
            idx, val = torch.ops.sparsify.pq_select(qc, kc, keep, False, None)
            ridx, rval = torch.ops.sparsify.pq_select(rqc, rkc, keep, False, None)
            xidx, xval = random_selection(q.shape[:3], n, keep, seed + 100 * li + keep)
            eidx, evalid = exact_topl(q, k, keep)
            recall_rt, tied = tie_analysis(q, k, qc, kc, keep)
            rows.append({
                "layer": li, "keep_frac": keep_frac, "keep": keep, "n": n, "head_dim": d,
                "subspaces": cb.shape[0], "codewords_used_per_subspace": round(usage, 2),
                "recall_pq": selection_recall(q, k, idx, val, keep, False),
                "recall_pq_random_ties": recall_rt, "keys_at_or_above_cut_per_slot": tied,
                "recall_pq_randcb": selection_recall(q, k, ridx, rval, keep, False),
                "recall_random": selection_recall(q, k, xidx, xval, keep, False),
                "expected_random": keep / n,
                "mass_pq": attention_mass(q, k, idx, val, scale),
                "mass_pq_randcb": attention_mass(q, k, ridx, rval, scale),
                "mass_random": attention_mass(q, k, xidx, xval, scale),
                "mass_exact": attention_mass(q, k, eidx, evalid, scale),
            })
    return rows


SETTINGS = {
    # name: (calibration sentences, evaluation sentences)
    "in-sample": (slice(0, 16), slice(0, 16)),
    "held-out": (slice(0, 8), slice(8, 16)),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[256, 512], help="tokens per sequence (<= 512)")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.125, 0.25])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--calibration-n", type=int, default=256)
    p.add_argument("--threads", type=int, help="CPU torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=T.default_out_dir())
    p.add_argument("--stem")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu")  # selection quality does not depend on the device; CPU is enough
    with T.cpu_threads(device, args.threads or 1):
        return run(args, device)


def run(args, device) -> dict:
    from sparsify_examples.models import load_minilm, sample_texts

    started = time.perf_counter()
    env = T.environment(device)
    texts = sample_texts()
    results, meta = [], {}
    for setting in args.settings:
        cal_sl, eval_sl = SETTINGS[setting]
        model, tok = load_minilm(attn_implementation="sdpa")
        cal_inputs, cal_unique = batch(tok, texts[cal_sl], min(args.calibration_n, 512), seeds=[7])
        options = {"attention": {"method": "spt", "keep": min(args.keeps), "min_seq": 1}}
        t0 = time.perf_counter()
        report = sparsify.prepare(model, **cal_inputs, options=options)
        prep_s = time.perf_counter() - t0
        n_cb = sum(1 for n_, _ in model.named_parameters() if n_.endswith(CODEBOOK))
        print(f"[{setting}] prepare: {n_cb} codebooks, {len(report.by_kind('attention'))} attention regions "
              f"({prep_s:.1f} s); calibration: sentences {cal_sl.start}-{cal_sl.stop - 1}, "
              f"{cal_inputs['input_ids'].shape[1]} tokens")
        meta[setting] = {"calibration_sentences": [cal_sl.start, cal_sl.stop - 1],
                         "evaluation_sentences": [eval_sl.start, eval_sl.stop - 1],
                         "calibration_tokens": int(cal_inputs["input_ids"].shape[1]),
                         "calibration_unique_tokens": cal_unique, "codebooks": n_cb,
                         "regions": [str(r) for r in report.regions]}
        for n in args.n:
            if n > 512:
                print(f"  n={n}: NOT RUN (MiniLM has 512 positions)")
                continue
            inputs, unique = batch(tok, texts[eval_sl], n, seeds=[0, 1])
            meta[setting][f"eval_unique_tokens_n{n}"] = unique
            rows = evaluate(model, inputs, args.keeps, args.seed)
            for r in rows:
                r["setting"] = setting
            results += rows
            for keep in args.keeps:
                sel = [r for r in rows if r["keep_frac"] == keep]
                print(f"  n={n} keep={keep}: recall PQ " + " ".join(f"{r['recall_pq']:.3f}" for r in sel)
                      + f" | mean {statistics.mean(r['recall_pq'] for r in sel):.3f}, random codebook "
                      f"{statistics.mean(r['recall_pq_randcb'] for r in sel):.3f}, random keys "
                      f"{statistics.mean(r['recall_random'] for r in sel):.3f}")
        del model

    env = T.finish_environment(env, device, started)
    payload = {"benchmark": "spt_recall", "environment": env, "model": "all-MiniLM-L6-v2 (sparsify_examples.models.load_minilm)",
               "settings": {k_: v_ for k_, v_ in vars(args).items() if k_ != "out_dir"}, "setting_details": meta,
               "method": __doc__, "results": results}
    md = render_markdown(payload)
    print("\n" + md)
    stem = args.stem or f"spt_recall_{T.device_slug(device)}"
    paths = T.write_results(args.out_dir, stem, payload, md)
    print(f"\nwrote {paths[0]} and {paths[1]} ({env['wall_s']} s)")
    return payload


def render_markdown(payload) -> str:
    env = payload["environment"]
    res = payload["results"]
    out = ["# SPT selection recall on real q/k — all-MiniLM-L6-v2 (CPU)", "",
           f"torch {env['torch']}, {env['date_utc']} UTC, wall {env['wall_s']} s. Device: {env['device_name']}.", "",
           "recall = mean over query rows of |selected ∩ exact top-L of q·kᵀ| / L (sparsify.ops.key_select.selection_recall), "
           "L = ceil(keep·n), non-causal, batch of 2 sequences × 12 heads. Codebooks: k-means from "
           "sparsify.prepare (no codebook-loss training). Baselines: a random codebook with the data's "
           "per-subspace mean/std, and L random keys per query (expected L/n). mass = softmax attention mass "
           "on the selected keys (exact top-L = the ceiling for L keys). MiniLM has head_dim 32, so M = 4 PQ "
           "subspaces and the match score takes 5 values: most of the cut falls inside ties, which pq_select breaks "
           "by the lower key index; 'random tie-break' is the exact expectation if they were broken at random, and "
           "'keys scoring >= cut / L' says how many candidates compete for the L slots.", "",
           "Text: sample_texts() (16 sentences) repeated to n tokens — repeated sentences make repeated keys; "
           "'held-out' fits the codebooks on sentences 0-7 and evaluates on 8-15.", "",
           "## Mean over the 6 layers", ""]
    groups = sorted({(r["setting"], r["n"], r["keep_frac"]) for r in res}, key=lambda g: (g[0] != "in-sample", g[1], g[2]))
    rows = []
    for setting, n, keep in groups:
        sel = [r for r in res if (r["setting"], r["n"], r["keep_frac"]) == (setting, n, keep)]

        def m(key):
            return f"{statistics.mean(r[key] for r in sel):.3f}"
        rows.append([setting, n, keep, sel[0]["keep"], m("recall_pq"), m("recall_pq_random_ties"),
                     f"{statistics.mean(r['keys_at_or_above_cut_per_slot'] for r in sel):.1f}",
                     m("recall_pq_randcb"), m("recall_random"),
                     m("mass_pq"), m("mass_pq_randcb"), m("mass_random"), m("mass_exact")])
    out.append(T.markdown_table(["setting", "n", "keep", "L", "recall PQ (k-means)", "PQ, random tie-break (expected)",
                                 "keys scoring >= cut / L", "recall PQ (random cb)", "recall random keys", "mass PQ",
                                 "mass PQ random cb", "mass random", "mass exact top-L"], rows))
    out += ["", "## Per layer", ""]
    out.append(T.markdown_table(
        ["setting", "n", "keep", "layer", "recall PQ", "recall PQ random cb", "recall random", "mass PQ",
         "mass exact", "codewords used / 16"],
        [[r["setting"], r["n"], r["keep_frac"], r["layer"], f"{r['recall_pq']:.3f}", f"{r['recall_pq_randcb']:.3f}",
          f"{r['recall_random']:.3f}", f"{r['mass_pq']:.3f}", f"{r['mass_exact']:.3f}",
          r["codewords_used_per_subspace"]] for r in sorted(res, key=lambda r: (r["setting"] != "in-sample", r["n"],
                                                                                 r["keep_frac"], r["layer"]))]))
    return "\n".join(out)


if __name__ == "__main__":
    main()
