"""The decoder model: config, layers, attention dispatch, and the functional init/forward API."""

from jaxlm.model.config import ModelConfig
from jaxlm.model.loss import token_losses
from jaxlm.model.transformer import count_params, forward, init_params, logical_axes

__all__ = ["ModelConfig", "count_params", "forward", "init_params", "logical_axes",
           "token_losses"]
