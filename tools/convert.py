"""Convert between Hugging Face model directories and jaxlm checkpoints.

    python tools/convert.py hf_to_jaxlm /models/TinyLlama-1.1B /runs/tinyllama
    python tools/convert.py jaxlm_to_hf /runs/mine /exports/mine [--step 2000]
                                        [--max_shard_bytes 2147483648]

hf_to_jaxlm streams the safetensors in one tensor at a time (jaxlm.interop.hf_import.HFParams),
saving each into OUT_DIR/checkpoints/0 (the trainer's checkpoint format, params only) before
reading the next, and writes OUT_DIR/model.gin (the ModelConfig) and a copy
of tokenizer.json when the source has one. Start a run from it with

    include "OUT_DIR/model.gin"
    Stage.restore_from = @RestoreConfig()
    RestoreConfig.path = "OUT_DIR"
    huggingface_tokenizer.path = "OUT_DIR/tokenizer.json"

(OUT_DIR is a restore source, not a MODEL_DIR to train in: its record has no stage. It
converts back with jaxlm_to_hf, bit for bit.)
jaxlm_to_hf reads a run's checkpoint with the model of the stage that wrote it
(jaxlm.training.saved_run.load_saved_run), reading each tensor from the checkpoint only when its shard
is written, and writes config.json, sharded safetensors with their index, and the run's
tokenizer.json if it has one (jaxlm.interop.export_hf). Peak host memory is about one output
shard plus one tensor either way (tools/bench_convert.py measures it). Bad input is one line on
stderr and exit code 2.
"""

import argparse
import os
import shutil
import sys

from jaxlm.config.cli import run_guarded, setup_logging
from jaxlm.errors import UserError

MODEL_GIN = "model.gin"


def hf_to_jaxlm(src: str, out_dir: str) -> list[str]:
  """Returns the paths written. Every tensor is checked from the safetensors metadata first;
  then each is read, converted and saved before the next (peak host memory: one tensor)."""
  from jaxlm.checkpointing.checkpoint import Checkpointer, RunRecord  # pylint: disable=import-outside-toplevel
  from jaxlm.interop import gin_model_text, load_hf_config  # pylint: disable=import-outside-toplevel
  from jaxlm.interop.hf_import import HFParams  # pylint: disable=import-outside-toplevel
  if os.path.isdir(os.path.join(out_dir, "checkpoints")):
    raise UserError(f"{out_dir} already has a checkpoints/ folder; convert into a new directory")
  config = load_hf_config(src)
  source = HFParams(src, config)
  os.makedirs(out_dir, exist_ok=True)
  gin_text = gin_model_text(config, os.path.abspath(src))
  checkpointer = Checkpointer(out_dir)
  try:
    checkpointer.save_in_parts(
        0, ({"params": _nested(path, source.read(path))} for path in source.shapes),
        RunRecord(step=0, gin_config=gin_text, converted_from=os.path.abspath(src)))
  finally:
    checkpointer.close()
  written = [os.path.join(out_dir, "checkpoints", "0")]
  with open(os.path.join(out_dir, MODEL_GIN), "w", encoding="utf-8") as f:
    f.write(gin_text)
  written.append(os.path.join(out_dir, MODEL_GIN))
  tokenizer = os.path.join(src, "tokenizer.json")
  if os.path.exists(tokenizer):
    written.append(shutil.copy(tokenizer, os.path.join(out_dir, "tokenizer.json")))
  return written


def _nested(path: tuple, value) -> dict:
  for key in reversed(path):
    value = {key: value}
  return value


def jaxlm_to_hf(model_dir: str, out_dir: str, step: int | None = None,
                max_shard_bytes: int | None = None) -> list[str]:
  from jaxlm.interop import export_hf  # pylint: disable=import-outside-toplevel
  from jaxlm.interop.hf_export import DEFAULT_SHARD_BYTES  # pylint: disable=import-outside-toplevel
  from jaxlm.training.saved_run import load_saved_run  # pylint: disable=import-outside-toplevel
  run = load_saved_run(model_dir, step, lazy_params=True)  # Read one tensor at a time.
  with run.scope():
    files = export_hf(run.params, run.stage.model, out_dir, tokenizer=run.tokenizer,
                      max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES)
  return [os.path.join(out_dir, name) for name in files]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  to_jaxlm = sub.add_parser("hf_to_jaxlm", help="a Hugging Face directory -> a jaxlm checkpoint")
  to_jaxlm.add_argument("src", help="a local Hugging Face model directory (safetensors)")
  to_jaxlm.add_argument("out_dir", help="the directory to write checkpoints/ and model.gin into")
  to_hf = sub.add_parser("jaxlm_to_hf", help="a jaxlm run's checkpoint -> a Hugging Face directory")
  to_hf.add_argument("model_dir", help="the run's MODEL_DIR")
  to_hf.add_argument("out_dir", help="an empty (or new) directory for the Hugging Face files")
  to_hf.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  to_hf.add_argument("--max_shard_bytes", type=int, default=None,
                     help="largest safetensors shard (default: 2 GiB)")
  args = parser.parse_args(argv)
  setup_logging()

  def body() -> int:
    if args.command == "hf_to_jaxlm":
      written = hf_to_jaxlm(args.src, args.out_dir)
    else:
      written = jaxlm_to_hf(args.model_dir, args.out_dir, args.step, args.max_shard_bytes)
    for path in written:
      print(path)
    return 0

  return run_guarded(body)


if __name__ == "__main__":
  sys.exit(main())
