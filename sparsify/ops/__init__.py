"""The sparsify:: torch.library ops: schema, fake kernel, autograd, CPU reference, FLOP formula."""
from torch.utils.flop_counter import register_flop_formula
import torch

from . import attention as _attention  # noqa: F401  (registers sparsify::attention)
from . import mlp as _mlp  # noqa: F401  (registers sparsify::mlp)
from . import tag as _tag  # noqa: F401  (registers sparsify::tag)
from . import aux_loss as _aux_loss  # noqa: F401  (sparsify::aux_loss: gradient injection of auxiliary losses)
from . import density as _density  # noqa: F401  (sparsify::observe: what a compiled forward measured; DEFT)
from . import key_select as _key_select  # noqa: F401  (registers the SPT selection: pq_encode, pq_select, qk_select)
from . import spt as _spt  # noqa: F401  (registers spt_attention)
from . import spt_block as _spt_block  # noqa: F401  (pq_select_blocks, block_sparse_attention)
from . import routed as _routed  # noqa: F401  (routed_mlp: SPT routed FFN)
from . import sparse_down as _sparse_down  # noqa: F401  (sparse_down: DEFT's activation-sparse down projection)
from . import sparse_up as _sparse_up  # noqa: F401  (sparse_up: a gated MLP's up projection where the gate is non-zero)
from . import block_linear as _block_linear  # noqa: F401  (block_sparse_linear: MST's block mode)
from . import cuda as _cuda  # noqa: F401  (every CUDA registration: the Triton kernels)
from .attention import attention_reference
from .mlp import ACTIVATIONS, mlp_reference

register_flop_formula(torch.ops.sparsify.attention)(_attention.attention_flops)
register_flop_formula(torch.ops.sparsify.attention_backward)(_attention.attention_backward_flops)
register_flop_formula(torch.ops.sparsify.mlp)(_mlp.mlp_flops)
register_flop_formula(torch.ops.sparsify.mlp_backward)(_mlp.mlp_backward_flops)


# CPU SDPA's fused kernel has no formula in torch.utils.flop_counter (the CUDA ones do): the dense attention the
# backend lowers to SDPA (passes/lower.py) would count nothing on a CPU. The same count as torch's CUDA kernels.
def _register_cpu_sdpa_flops():
    from torch.utils import flop_counter as fc
    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in fc.flop_registry:
        @register_flop_formula(forward, get_raw=True)
        def _cpu_sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query.shape, key.shape, value.shape)
    if backward is not None and backward not in fc.flop_registry:
        @register_flop_formula(backward, get_raw=True)
        def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_register_cpu_sdpa_flops()

__all__ = ["ACTIVATIONS", "attention_reference", "mlp_reference"]
