"""Hand-written kernels (Pallas) and the attention implementations they provide.

`jaxlm.kernels.attention_impls` registers 'pallas', 'cudnn', 'splash' and 'auto' in
`jaxlm.model.attention.ATTENTION_IMPLS`; the model imports it on first use of a non-XLA impl.
"""
