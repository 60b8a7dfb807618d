"""PNG plots comparing training runs, read from each run's MODEL_DIR/metrics.jsonl.

    python tools/plot_runs.py runs/base runs/wider
    python tools/plot_runs.py base=runs/base_s0,runs/base_s1 muon=runs/muon_s0,runs/muon_s1 \
        --x=tokens --out=plots/tokens --target=eval/loss:2.16

A run argument is DIR (named by its basename) or NAME=DIR[,DIR...]: several MODEL_DIRs are seeds
of one arm, drawn as their mean with a band of +-1 standard deviation over the seeds (sample
s.d.; at the first seed's x points inside every seed's x range, other seeds interpolated there)
and "(n=K)" in the legend; one DIR is a plain line. x is steps, tokens (total/tokens) or FLOPs
(total/flops). Files written into --out (default: plots/ beside the first DIR):

    train_loss.png          train/loss (nats/token)
    eval_loss.png           eval/<domain>/loss, one panel per domain (and eval/loss as "all")
    eval_bits_per_byte.png  eval/<domain>/bits_per_byte, likewise: bits per byte never shares
                            an axis with nats per token
    learning_rate.png       train/learning_rate
    throughput.png          perf/tokens_per_sec
    forgetting.png          forgetting/<domain>, one panel per domain (and forgetting/all)

Rules:
- y range of the loss figures (train loss, eval loss, bits per byte): every curve, band and
  target over the last 75% of the panel's x span (a curve ending before that: its last point),
  plus 10% margin. The steep first quarter of training is cut off so that differences of
  0.01-0.1 between arms at the end are visible; the x axis still shows all of training.
- Units: nats per token are comparable only between runs that tokenize alike. Where the runs'
  tokenizers differ (their final eval loss over bits per byte, ln 2 times the eval text's bytes
  per token, differs by over 5% on a domain), the nats-per-token figures (train loss, eval
  loss, forgetting) are not drawn; eval_bits_per_byte.png is the comparison.
- Forgetting (eval loss minus the stage's first evaluation) is drawn only where a stage follows
  another: in a run that started from another run's checkpoint, or after the second stage of a
  run began (a stage start is a data/proportion record followed by the stage's baseline
  evaluation at the same step; a resume writes the proportions but no baseline).
- Branches: a run restored from another run's checkpoint (MODEL_DIR/restore_report.json, or
  else RestoreConfig.path/step in MODEL_DIR/config.gin) starts counting steps, tokens and FLOPs
  at 0; it is drawn from its branch point, x offset by the source run's x at the restored step,
  so that its first point lies on the source's curve. A source without metrics.jsonl (a Hugging
  Face directory, or a run not on this disk): drawn from 0.
- A resumed run may log a step twice: the last record of each (step, key) wins.
- x tick labels use SI prefixes (100k, 1.5M, 2G).

From Python: `plot_runs({name: [dir, ...]}, out_dir, x="tokens", targets={"eval/loss": 2.16})
-> [paths]` (`targets`: a dashed "target" line in the panels of that metric); `figures(...)` the
same as matplotlib Figures; `read_metrics(run_dir, x)` one run's series as {key: (xs, ys)};
`named_runs(items)` the report tools' NAME=DIR[,DIR...] arguments as {name: [dir, ...]}. Bad
input (a DIR without metrics.jsonl, an unknown --x, a record without the x axis's key, NAME=
without a DIR) is one line on stderr, exit 2.
"""

import argparse
import os
import sys

from jaxlm.reports.plots import plot_runs
from jaxlm.reports.runs import ReportError, named_runs

def _target(text: str) -> tuple[str, float]:
  key, _, value = text.rpartition(":")
  try:
    if key:
      return key, float(value)
  except ValueError:
    pass
  raise ReportError(f"--target={text!r}: expected METRIC:VALUE, e.g. eval/loss:2.16")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("runs", nargs="+", metavar="RUN",
                      help="DIR or NAME=DIR[,DIR...]: MODEL_DIRs with metrics.jsonl (several: "
                           "seeds of one arm)")
  parser.add_argument("--x", default="step", help="x axis: step, tokens or flops")
  parser.add_argument("--out", default=None,
                      help="folder for the PNGs (default: plots/ beside the first DIR)")
  parser.add_argument("--target", action="append", default=[],
                      help="METRIC:VALUE, a target line in that metric's panels (repeatable)")
  args = parser.parse_args(argv)
  try:
    runs = named_runs(args.runs, plain=True)
    targets = dict(_target(t) for t in args.target)
    first = next(iter(runs.values()))[0]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(first)), "plots")
    paths = plot_runs(runs, out, x=args.x, targets=targets)
  except ReportError as e:
    print(f"plot_runs: error: {e}", file=sys.stderr)
    return 2
  if not paths:
    print("plot_runs: no run has any of the plotted metrics", file=sys.stderr)
  for path in paths:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
