"""Command line: sample completions from a trained run (decoding.py: greedy, temperature,
top-k and top-p, a batch of prompts, a KV cache).

    python -m jaxlm.generate --model_dir=/tmp/quick --prompt='def ' --prompt='class ' \\
        [--max_new_tokens=128] [--temperature=0.8] [--top_k=40] [--top_p=0.95] [--seed=0] \\
        [--step=N] [--json=out.json] [--no_cache] [--gin.NAME=VALUE ...]
"""

import argparse
import dataclasses
import json
import logging
import sys
import time

import jax
import numpy as np

from jaxlm.config import cli
from jaxlm.evaluation.decoding import Sampling, generate_tokens
from jaxlm.errors import UserError
from jaxlm.training import compilation_cache

log = logging.getLogger("jaxlm")


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m jaxlm.generate", description="Sample completions from a trained run.",
      epilog="Example: python -m jaxlm.generate --model_dir=/tmp/quick --prompt='def ' "
             "--max_new_tokens=200 --temperature=0.8 --top_p=0.95")
  parser.add_argument("--model_dir", required=True, help="the MODEL_DIR of a trained run")
  parser.add_argument("--prompt", action="append", default=[],
                      help="text to continue (repeatable: the prompts run as one batch)")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.8,
                      help="0: greedy (top_k and top_p then change nothing)")
  parser.add_argument("--top_k", type=int, default=0, help="keep the k most likely; 0: off")
  parser.add_argument("--top_p", type=float, default=1.0, help="nucleus mass; 1: off")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
  parser.add_argument("--json", default=None, metavar="PATH",
                      help="also write the prompts and completions to this JSON file")
  parser.add_argument("--no_cache", action="store_true",
                      help="re-run the whole window per token (the slow reference)")
  cli.add_gin_arguments(parser)
  compilation_cache.add_argument(parser)
  return cli.parse_with_gin_flags(parser, argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cli.setup_logging()

  def run() -> int:
    compilation_cache.enable(args.compilation_cache)
    if not args.prompt:
      raise UserError("no prompt given; pass --prompt=TEXT (repeat it for a batch)")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
      raise UserError(f"--max_new_tokens={args.max_new_tokens}; it must be at least 1")
    from jaxlm.training.saved_run import load_saved_run  # After the flags: a typo fails fast.
    saved = load_saved_run(args.model_dir, args.step, args.gin_file, args.gin_bindings,
                           args.gin_search_paths)
    config, tokenizer = saved.stage.model, saved.tokenizer
    if sampling.top_k > config.vocab_size:
      raise UserError(f"top_k={sampling.top_k} exceeds the vocabulary ({config.vocab_size}); "
                      "lower --top_k (0 keeps every token)")
    prompts = [[tokenizer.bos_id, *np.asarray(tokenizer.encode(p)).tolist()] for p in args.prompt]
    pad_id = getattr(tokenizer, "pad_id", None)
    with saved.scope():
      start = time.perf_counter()
      result = generate_tokens(saved.params, config, prompts, args.max_new_tokens,
                               jax.random.key(args.seed), sampling, tokenizer.eos_id,
                               0 if pad_id is None else pad_id, use_cache=not args.no_cache)
      seconds = time.perf_counter() - start
    total = sum(len(t) for t in result.tokens)
    log.info("step %d: %d new tokens in %.2f s, compilation included (%.1f tokens/s)",
             saved.step, total, seconds, total / seconds)
    completions = [tokenizer.decode(ids) for ids in result.tokens]
    for i, (prompt, completion) in enumerate(zip(args.prompt, completions)):
      ending = "eos" if result.stopped_on_eos[i] else "max_new_tokens"
      print(f"=== prompt {i + 1} of {len(prompts)} ({len(result.tokens[i])} tokens, "
            f"stopped at {ending}) ===")
      print(prompt + completion)
    if args.json:
      record = {"model_dir": saved.model_dir, "step": saved.step, "seed": args.seed,
                "max_new_tokens": args.max_new_tokens, "sampling": dataclasses.asdict(sampling),
                "results": [{"prompt": p, "completion": c, "token_ids": ids, "stopped_on_eos": s}
                            for p, c, ids, s in zip(args.prompt, completions, result.tokens,
                                                    result.stopped_on_eos)]}
      try:
        with open(args.json, "w", encoding="utf-8") as f:
          json.dump(record, f, indent=1)
      except OSError as e:
        raise UserError(f"cannot write --json={args.json!r}: {e.strerror}") from None
    return 0

  return cli.run_guarded(run)


if __name__ == "__main__":
  sys.exit(main())
