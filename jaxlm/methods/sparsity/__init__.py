"""Sparse and memory-efficient pretraining (docs/methods.md, part C): masks as a pytree in the
method state (selection.py), per-matrix density (distribution.py: uniform, ERK), exact top-k
without gathering a sharded matrix (topk.py), and the algorithms as stage methods plus the SPDF
'densify' transition (methods.py), and SLTrain's 'sltrain_to_dense' transition (sltrain.py; its
weights are jaxlm/model/sparse_plus_low_rank.py)."""

# Importing registers the gin configurables and the transitions.
from jaxlm.methods.sparsity import methods, sltrain  # noqa: F401
