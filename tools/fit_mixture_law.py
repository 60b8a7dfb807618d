"""Fit the D-CPT and CMR mixture laws to a sweep of continual-pretraining runs over mixture
ratios, and check the fit on a held-out ratio (jaxlm.continual.mixture_laws).

    python tools/fit_mixture_law.py --run 0.125=runs/mix_1_8 --run 0.25=runs/mix_1_4 \\
        --run 0.5=runs/mix_1_2 --run 0.333=runs/mix_1_3 --holdout 0.375=runs/mix_3_8 \\
        --general=prose --domain=french [--tolerance=0.01] [--out=plots/mixture_law]

Each --run is RATIO=MODEL_DIR: a run that continued from the same checkpoint with that share of
new-domain data (DataConfig.mixture). Its eval/<general>/loss and eval/<domain>/loss against the
tokens it trained (total/tokens) are the points; the record at 0 tokens (the stage's baseline
evaluation) is the general loss before continual pretraining. Prints the fitted parameters, the
held-out ratio's predicted and measured final losses with the relative error, the critical
mixture ratio at the sweep's budget and the CMR budget law; writes mixture_law.png (points and
fitted curves) into --out. Bad input is one line on stderr, exit 2.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plot_runs  # noqa: E402  pylint: disable=wrong-import-position
from jaxlm.continual import mixture_laws  # noqa: E402  pylint: disable=wrong-import-position


class LawError(ValueError):
  """Bad input: one line on stderr, exit 2."""


def parse_run(text: str) -> tuple[float, str]:
  ratio, sep, path = text.partition("=")
  try:
    value = float(ratio)
  except ValueError:
    value = -1.0
  if not sep or not 0.0 <= value <= 1.0:
    raise LawError(f"--run/--holdout {text!r} must be RATIO=MODEL_DIR with RATIO in [0, 1]")
  return value, path


def run_points(ratio: float, run_dir: str, general: str, domain: str) -> dict:
  """{"general"|"domain": (tokens, losses)} after the start, and the general loss at 0 tokens."""
  try:
    series = plot_runs.read_metrics(run_dir, x="tokens")
  except plot_runs.PlotError as e:
    raise LawError(str(e)) from None
  out = {}
  for kind, name in (("general", general), ("domain", domain)):
    key = f"eval/{name}/loss"
    if key not in series:
      have = sorted({k.split("/")[1] for k in series if k.startswith("eval/") and k.count("/") == 2})
      raise LawError(f"{run_dir} (ratio {ratio}) logged no {key}; its domains: {have}")
    tokens, losses = (np.asarray(v, np.float64) for v in series[key])
    out[kind] = (tokens[tokens > 0], losses[tokens > 0])
    if kind == "general":
      out["before"] = float(losses[tokens == 0][0]) if np.any(tokens == 0) else None
  if len(out["general"][0]) == 0:
    raise LawError(f"{run_dir} has no evaluation after its first update")
  return out


def fit(runs: dict[float, dict]) -> dict[str, mixture_laws.DcptLaw]:
  laws = {}
  for kind in ("general", "domain"):
    tokens, shares, losses = [], [], []
    for ratio, points in runs.items():
      t, loss = points[kind]
      share = ratio if kind == "domain" else 1.0 - ratio
      tokens.append(t), shares.append(np.full_like(t, share)), losses.append(loss)
    laws[kind] = mixture_laws.fit_dcpt(np.concatenate(tokens), np.concatenate(shares),
                                       np.concatenate(losses))
  return laws


def plot(runs, holdout, laws, out_dir: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  everything = {**runs, **holdout}
  for ax, kind in zip(axes, ("general", "domain")):
    for ratio, points in sorted(everything.items()):
      t, loss = points[kind]
      share = ratio if kind == "domain" else 1.0 - ratio
      dense = np.geomspace(t.min(), t.max(), 100)
      line, = ax.plot(dense, laws[kind](dense, share), "--" if ratio in holdout else "-")
      ax.plot(t, loss, "o", color=line.get_color(),
              label=f"r={ratio:g}{' (held out)' if ratio in holdout else ''}")
    ax.set_xscale("log")
    ax.set_xlabel("continual-pretraining tokens")
    ax.set_ylabel(f"{kind} loss")
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "mixture_law.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def report(runs, holdout, laws, tolerance: float) -> list[str]:
  lines = ["| law | " + " | ".join(mixture_laws.NAMES) + " |",
           "|---|" + "---|" * len(mixture_laws.NAMES)]
  for kind, law in laws.items():
    lines.append(f"| {kind} | " + " | ".join(f"{v:.4g}" for v in law.as_dict().values()) + " |")
  lines += ["", "| held-out ratio | loss | measured (final) | predicted | relative error |",
            "|---|---|---|---|---|"]
  for ratio, points in sorted(holdout.items()):
    for kind in ("general", "domain"):
      t, loss = points[kind]
      share = ratio if kind == "domain" else 1.0 - ratio
      predicted = float(laws[kind](t[-1], share))
      lines.append(f"| {ratio:g} | {kind} | {loss[-1]:.4f} | {predicted:.4f} | "
                   f"{abs(predicted - loss[-1]) / loss[-1]:.2%} |")
  befores = [p["before"] for p in runs.values() if p["before"] is not None]
  if befores:
    before = float(np.mean(befores))
    budget = max(float(p["general"][0][-1]) for p in runs.values())
    cmr = mixture_laws.critical_mixture_ratio(laws["general"], budget, before, tolerance)
    lines += ["", f"Critical mixture ratio at {budget:,.0f} tokens (general loss within "
              f"{tolerance:.1%} of {before:.4f}): {cmr:.3f}"]
    budgets = np.geomspace(budget / 8, budget, 6)
    cmrs = [mixture_laws.critical_mixture_ratio(laws["general"], b, before, tolerance)
            for b in budgets]
    try:
      b0, b1, s = mixture_laws.fit_cmr_budget_law(budgets, cmrs)
      lines.append(f"CMR budget law: R_CMR(D) = {b0:.4f} + {b1:.4f} * (D / 1e6)^{s:.4f}")
    except RuntimeError:
      lines.append(f"CMR budget law: not fitted (CMRs over budgets: {np.round(cmrs, 3)})")
  return lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", action="append", default=[], help="RATIO=MODEL_DIR (fitted)")
  parser.add_argument("--holdout", action="append", default=[], help="RATIO=MODEL_DIR (checked)")
  parser.add_argument("--general", required=True, help="the general (old) eval domain")
  parser.add_argument("--domain", required=True, help="the new domain's eval domain")
  parser.add_argument("--tolerance", type=float, default=0.01,
                      help="relative rise of the general loss the CMR allows")
  parser.add_argument("--out", default=None, help="folder for mixture_law.png")
  args = parser.parse_args(argv)
  try:
    runs = {ratio: run_points(ratio, path, args.general, args.domain)
            for ratio, path in map(parse_run, args.run)}
    holdout = {ratio: run_points(ratio, path, args.general, args.domain)
               for ratio, path in map(parse_run, args.holdout)}
    if len(runs) < 2:
      raise LawError(f"give at least two --run ratios to fit (got {len(runs)})")
    laws = fit(runs)
  except (LawError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(report(runs, holdout, laws, args.tolerance)))
  if args.out:
    print(plot(runs, holdout, laws, args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
