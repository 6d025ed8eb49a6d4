"""What regions may be rewritten into: one file per method, one registry (base.py: the protocol).

Built in: dense (every block's default), spt (SPT sparse attention), routed (SPT's routed FFN), deft (DEFT's density
loss and sparse inference), ada_deft (our reconstruction of ADA-DEFT: learned layer gates that skip MLPs), mst (MST's dynamic sparse
weights on every projection; the loop is sparsify.training.MixedSparsity), hsa (MST's hybrid sparse attention). Importing this
package registers them; a new method is one more file here (registered on import) plus, at most, one op family
under sparsify/ops and one kernel family under sparsify/codegen.
"""
from .base import (MODES, Method, StateKind, guess_mode, method_for, methods_in, register, report_facts,
                   state_kinds, unregister)
from . import dense, routed, spt, deft, ada_deft, mst, hsa  # noqa: F401,E402  (the built-in methods register themselves)

__all__ = ["MODES", "Method", "StateKind", "guess_mode", "method_for", "methods_in", "register", "report_facts",
           "state_kinds", "unregister"]
