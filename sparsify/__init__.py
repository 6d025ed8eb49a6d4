"""sparsify: compile sparsity into stock Transformers with torch.compile(model, backend="sparsify")."""
from .backend import backend, count_flops, explain, flops_by_block, last_report, sparsify_backend
from .config import AttentionConfig, LinearConfig, MLPConfig, SparseAttention, SparsifyConfig
from .debug import Report, RegionReport
from .plan import SparsifyError
from . import methods  # noqa: F401  (registers the built-in methods: their options join the config)
from .checkpoint import load_state
from .prepare import prepare
from .steps import BetweenSteps
from . import training  # noqa: F401  (sparsify.training.MixedSparsity: MST's loop)
from .ops.aux_loss import aux_losses
from .ops.density import activation_density
from . import ops  # noqa: F401  (registers torch.ops.sparsify.*)

__version__ = "0.1.0"
__all__ = ["AttentionConfig", "BetweenSteps", "LinearConfig", "MLPConfig", "SparseAttention", "load_state", "prepare", "Report", "RegionReport", "SparsifyConfig", "SparsifyError",
           "activation_density", "aux_losses", "backend", "count_flops", "explain", "flops_by_block", "last_report", "sparsify_backend"]
