"""Evaluating and decoding a trained model: held-out loss and bits per byte, what a run
evaluates and when, sampling with a KV cache, and lm-evaluation-harness."""
