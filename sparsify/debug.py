"""What the passes found and did: the match report, graph dumps, and logging through torch._logging.

TORCH_LOGS="sparsify" shows one line per region (INFO); TORCH_LOGS="+sparsify" adds the graphs (DEBUG).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

log = logging.getLogger("sparsify")


def _register_with_torch_logging() -> None:
    """Make TORCH_LOGS know the "sparsify" name. TORCH_LOGS is parsed when torch is imported, before
    this module exists, so re-read it once if it names us."""
    internal = torch._logging._internal
    try:
        internal.register_log("sparsify", "sparsify")
    except Exception:  # already registered (module reloaded) or API moved: plain logging still works
        return
    if "sparsify" in os.environ.get("TORCH_LOGS", ""):
        internal._init_logs()


_register_with_torch_logging()


def single_handlers() -> None:
    """Drop duplicate stream handlers of our logger. TORCH_LOGS="sparsify" is read both as our registered name and
    as a module name whenever torch re-reads the variable (imports of torch's compiler stack do), and each
    reading adds a handler: every line would print twice. Called before each graph's lines are logged."""
    seen = set()
    for handler in list(log.handlers):
        key = (type(handler), getattr(handler, "stream", None), getattr(handler, "baseFilename", None))
        if key in seen:
            log.removeHandler(handler)
        seen.add(key)

# the facts every row of a kind shows; the pipeline adds the registered methods' own (methods.report_facts)
REGION_FACTS = {
    "attention": ("source", "mask", "causal", "scale", "dropout_p", "heads", "kv_heads", "head_dim"),
    "mlp": ("activation", "gated", "bias", "lora", "dropout_p", "d_model", "d_ff", "experts", "top_k"),
    "linear": ("in_features", "out_features", "bias", "lora"),
}



@dataclass
class RegionReport:
    kind: str
    module: str
    decision: str
    reason: str
    facts: dict
    graph: int
    shown: tuple = ()    # the facts the table and the JSON show (REGION_FACTS of its kind + its methods' own)
    mode: str = "train"  # the graph's mode ("train": autograd runs through it; "eval") the decision was made for

    def __str__(self) -> str:
        return (f"{self.kind} {self.module or '<root>'}: {self.decision}"
                + (f" ({self.reason})" if self.reason else "") + f" [{self.mode}]")


@dataclass
class Report:
    """Everything the backend matched, across all graphs Dynamo produced for a call."""
    regions: list = field(default_factory=list)
    graphs: int = 0
    # modules named like attention / MLP blocks in which no region was found (regions.unmatched_blocks): they run
    # as written whatever the options ask; rows with decision "unmatched", apart from `regions`
    unmatched: list = field(default_factory=list)
    # Dynamo's graph-break reasons recorded while this report's graphs were traced (new_graph_breaks): the code
    # between the pieces runs uncompiled, so no pass sees it, and a block inside it runs as written
    graph_breaks: list = field(default_factory=list)

    @classmethod
    def merged(cls, reports: list) -> "Report":
        """One report of several graphs' (a model with graph breaks compiles a graph per piece)."""
        out = cls(graphs=sum(r.graphs for r in reports))
        for r in reports:
            out.regions.extend(r.regions)
            out.unmatched.extend(r.unmatched)
            out.graph_breaks.extend(b for b in r.graph_breaks if b not in out.graph_breaks)
        return out

    def by_kind(self, kind: str) -> list:
        return [r for r in self.regions if r.kind == kind]

    @property
    def rewritten(self) -> list:
        return [r for r in self.regions if r.decision not in ("dense", "skipped")]

    def table(self) -> str:
        rows = [("graph", "mode", "kind", "module", "decision", "facts / reason")]
        for r in self.regions + self.unmatched:
            detail = r.reason or ", ".join(f"{k}={_fmt(r.facts[k])}" for k in r.shown if k in r.facts)
            rows.append((str(r.graph), r.mode, r.kind, r.module or "<root>", r.decision, detail))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in rows]
        lines.insert(1, "-" * min(160, max(len(line) for line in lines)))
        linear = self.by_kind("linear")
        summary = (f"{len(self.by_kind('attention'))} attention + {len(self.by_kind('mlp'))} mlp "
                   + (f"+ {len(linear)} linear " if linear else "")
                   + f"regions in {self.graphs} graph(s); {len(self.rewritten)} rewritten"
                   + (f"; {len(self.unmatched)} block(s) not recognised" if self.unmatched else ""))
        breaks = [f"graph break: {b}" for b in self.graph_breaks]
        return "\n".join(lines + [summary] + breaks)

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> list:
        return [{"graph": r.graph, "mode": r.mode, "kind": r.kind, "module": r.module, "decision": r.decision,
                 "reason": r.reason, "facts": {k: _fmt(r.facts[k]) for k in r.shown if k in r.facts}}
                for r in self.regions + self.unmatched]


_seen_breaks: Counter = Counter()  # Dynamo's graph_break counter as the last new_graph_breaks call saw it
_warned_breaks: set = set()


def new_graph_breaks(announce: bool) -> list:
    """Graph-break reasons Dynamo recorded since the last call (torch._dynamo.utils.counters["graph_break"]): Dynamo
    records a break before it hands the graph up to it to the backend, so each graph's call sees the breaks that
    ended it. Warned once per reason (announce): code Dynamo could not capture runs uncompiled, and sparsify
    cannot rewrite a block that lies in it."""
    from torch._dynamo.utils import counters

    now = Counter(counters["graph_break"])
    fresh = [reason for reason, n in now.items() if n > _seen_breaks.get(reason, 0)]
    _seen_breaks.clear()
    _seen_breaks.update(now)
    reasons = [" ".join(str(r).split())[:300] for r in fresh]
    for reason in reasons:
        if announce and reason not in _warned_breaks:
            _warned_breaks.add(reason)
            warnings.warn(f"sparsify: Dynamo broke the graph ({reason}); the code around the break runs uncompiled, "
                          "and an attention or MLP block in it runs as written. sparsify.last_report(graphs=n) lists "
                          "the breaks of the last n graphs", stacklevel=4)
    return reasons


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def region_reports(regions, graph_index: int, extra_facts=lambda kind: ()) -> list:
    """The report rows of `regions`; extra_facts(kind): the facts the methods of that kind add to its rows."""
    return [RegionReport(r.kind, r.module, r.decision, r.reason,
                         {k: v for k, v in r.facts.items() if not k.startswith("_")}, graph_index,
                         REGION_FACTS[r.kind] + tuple(extra_facts(r.kind)), r.mode)
            for r in regions]


def unmatched_reports(blocks, graph_index: int, mode: str) -> list:
    """Report rows of regions.unmatched_blocks' (kind, path, class name) entries."""
    return [RegionReport(kind, path, "unmatched", f"{cls}: no {kind} pattern recognised; it runs as written",
                         {"class": cls}, graph_index, ("class",), mode) for kind, path, cls in blocks]


def dump_graph(directory: Optional[str], graph_index: int, stage: str, gm: torch.fx.GraphModule) -> None:
    text = gm.print_readable(print_output=False)
    log.debug("graph %d %s the passes:\n%s", graph_index, stage, text)
    if directory:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"graph_{graph_index}_{stage}.py"), "w") as fh:
            fh.write(text)


def dump_report(directory: Optional[str], graph_index: int, report: Report, plan: dict) -> None:
    for r in report.regions:
        log.info("graph %d: %s", graph_index, r)
    if directory:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"regions_{graph_index}.txt"), "w") as fh:
            fh.write(report.table() + "\n")
        with open(os.path.join(directory, f"plan_{graph_index}.json"), "w") as fh:
            json.dump({"regions": report.to_json(), **plan}, fh, indent=2)
