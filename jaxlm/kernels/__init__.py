"""Hand-written kernels (Pallas) and the attention implementations they provide.

`jaxlm.kernels.attention_impls` defines 'pallas', 'cudnn' and 'splash' and the choice behind
'auto'. The model's dispatch table (`ATTENTION_IMPLS` in model/attention.py) names them and
imports that module on first use of a non-XLA impl. Nothing here imports the model: the mask
both share is in `jaxlm.masking`.
"""
