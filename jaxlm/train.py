"""Command line: `python -m jaxlm.train --gin_file=F [--gin_file=G] [--gin.NAME=VALUE ...]`.

T5X-style flags: gin files are parsed in order, then bindings (`--gin.NAME=VALUE` or
`--gin_bindings='NAME = VALUE'`), so later settings win.

Exit codes: 0 done; 2 bad input (one line on stderr); 3 training diverged (too many
consecutive non-finite steps); 75 preempted by SIGTERM/SIGINT after saving a checkpoint (run
the same command to resume); 130 a second signal (no final checkpoint).
"""

import argparse
import logging
import sys

import jax

from jaxlm.config import cli
from jaxlm.config import gin_config
from jaxlm.training import compilation_cache
from jaxlm.training import host_memory
from jaxlm.errors import TrainingDiverged
from jaxlm.training.preemption import EXIT_FORCED, EXIT_PREEMPTED

EXIT_USER_ERROR = cli.EXIT_USER_ERROR
EXIT_DIVERGED = 3


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m jaxlm.train", description=__doc__.split("\n\n")[0],
      epilog="Example: python -m jaxlm.train --gin_file=experiments/quickstart.gin "
             "--gin.MODEL_DIR=\"'/tmp/quick'\"")
  cli.add_gin_arguments(parser)
  parser.add_argument("--host_malloc", choices=("keep", "system"), default="keep",
                      help="keep: glibc malloc keeps freed memory and CPU steps run one at a "
                           "time (faster on CPU, resident memory stays at about one step's "
                           "worth; see jaxlm/training/host_memory.py); system: glibc's defaults")
  compilation_cache.add_argument(parser)
  parser.add_argument("--dry_run", action="store_true",
                      help="run every start-up check (config, unused bindings, data, MODEL_DIR, "
                           "checkpoints), then exit without writing anything")
  args = cli.parse_with_gin_flags(parser, argv)
  if args.dry_run:
    args.gin_bindings.append("run.dry_run = True")
  if not args.gin_file:
    parser.error("give at least one --gin_file, e.g. --gin_file=experiments/quickstart.gin")
  return args


def final_summary(results: dict[str, float]) -> str:
  """The run's final figures, each to 4 significant digits (a learning rate of 3e-5 stays
  3e-05; rounding to decimals would print it as 0.0)."""
  return ", ".join(f"{k}={v:.4g}" for k, v in results.items())


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.host_malloc == "keep":
    host_memory.keep_freed_memory()
  cli.setup_logging()

  def train() -> int:
    compilation_cache.enable(args.compilation_cache)
    gin_config.parse(args.gin_file, args.gin_bindings, args.gin_search_paths)
    from jaxlm import parallel  # After parsing: import-time work never hides a flag error.
    from jaxlm.training import trainer
    parallel.initialize_distributed(parallel.DistributedConfig())  # Before any device is used.
    if jax.process_index() != 0:  # One voice per run: other processes only warn.
      logging.getLogger("jaxlm").setLevel(logging.WARNING)
    try:
      results = trainer.run()
    except TrainingDiverged as e:
      return cli.fail(str(e), EXIT_DIVERGED)
    if results.pop("preempted"):
      return EXIT_PREEMPTED
    logging.getLogger("jaxlm").info("done: %s", final_summary(results))
    return 0

  try:
    return cli.run_guarded(train)
  except KeyboardInterrupt:  # Only before training starts; during it, signals are handled.
    print("jaxlm: interrupted", file=sys.stderr)
    return EXIT_FORCED


if __name__ == "__main__":
  sys.exit(main())
