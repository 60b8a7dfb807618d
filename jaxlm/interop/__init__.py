"""Interop with other ecosystems' checkpoints: Hugging Face Llama-family and Mixtral import
(hf_import) and export (hf_export)."""

from jaxlm.interop.hf_config import (gin_model_text, hf_model_config, load_hf_config,
                                     model_config_from_hf, write_gin_model_file)
from jaxlm.interop.hf_export import export_hf, hf_config_dict
from jaxlm.interop.hf_import import import_hf, import_hf_params

__all__ = ["export_hf", "gin_model_text", "hf_config_dict", "hf_model_config", "import_hf",
           "import_hf_params", "load_hf_config", "model_config_from_hf", "write_gin_model_file"]
