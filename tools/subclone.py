"""Cut a smaller model out of a trained run (weight subcloning, Samragh et al. 2312.09299).

    python tools/subclone.py /runs/large /runs/large_sub --d_model 64 --num_layers 2 \
        --num_heads 2 --num_kv_heads 1 --mlp_dim 192 [--batches 4] [--step N]

Ranks the large model's neurons by their mean activation magnitude on the first --batches
training batches of the stage that wrote the checkpoint (jaxlm.methods.growth.subcloning), keeps the
most important ones, and writes OUT_DIR as a Hugging Face directory (config.json, safetensors)
that a run starts from:

    Stage.restore_from = @RestoreConfig()
    RestoreConfig.path = "OUT_DIR"
    Stage.model = @hf_model_config()
    hf_model_config.path = "OUT_DIR"

Sizes not given keep the large model's. Bad input is one line on stderr and exit code 2.
"""

import argparse
import dataclasses
import sys

from jaxlm.config.cli import run_guarded, setup_logging
from jaxlm.errors import UserError

SIZES = ("d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim")


def subclone_run(model_dir: str, out_dir: str, sizes: dict, batches: int = 4,
                 step: int | None = None) -> list[str]:
  import jax  # pylint: disable=import-outside-toplevel
  from jaxlm.methods.growth.subcloning import activation_stats, subclone  # pylint: disable=import-outside-toplevel
  from jaxlm.interop import export_hf  # pylint: disable=import-outside-toplevel
  from jaxlm.training.run_plan import build_stage_data  # pylint: disable=import-outside-toplevel
  from jaxlm.training.saved_run import load_saved_run  # pylint: disable=import-outside-toplevel
  run = load_saved_run(model_dir, step)
  large = run.stage.model
  small = dataclasses.replace(large, head_dim=large.resolved_head_dim,
                              **{k: v for k, v in sizes.items() if v is not None})
  train = build_stage_data(run.stage, {}).train
  params = jax.device_get(run.params)
  stats = activation_stats(params, large, (train.batch_at(i)["inputs"] for i in range(batches)))
  return export_hf(subclone(params, large, small, stats), small, out_dir)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("model_dir", help="the large run's MODEL_DIR")
  parser.add_argument("out_dir", help="an empty (or new) directory for the small model")
  for size in SIZES:
    parser.add_argument(f"--{size}", type=int, default=None)
  parser.add_argument("--batches", type=int, default=4,
                      help="training batches the activation magnitudes are averaged over")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  args = parser.parse_args(argv)
  setup_logging()

  def body() -> int:
    if args.batches < 1:
      raise UserError(f"--batches={args.batches}; give at least 1")
    for path in subclone_run(args.model_dir, args.out_dir, {s: getattr(args, s) for s in SIZES},
                             args.batches, args.step):
      print(path)
    return 0

  return run_guarded(body)


if __name__ == "__main__":
  sys.exit(main())
