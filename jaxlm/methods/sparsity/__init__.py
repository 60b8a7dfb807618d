"""Sparse and memory-efficient pretraining (docs/methods.md, part C): masks as a pytree in the
method state (selection.py), per-matrix density (distribution.py: uniform, ERK), exact top-k
without gathering a sharded matrix (topk.py), and the algorithms as stage methods plus the SPDF
'densify' transition (methods.py)."""

# Importing registers the gin configurables and the densify transition.
from jaxlm.methods.sparsity import methods  # noqa: F401
