"""jaxlm: a JAX-native research codebase for efficient language-model pretraining."""

__version__ = "0.1.0"
