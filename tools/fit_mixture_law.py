"""Fit the D-CPT and CMR mixture laws to continual-pretraining runs over mixture ratios and run
lengths, the way D-CPT fits them, and check the fit on held-out runs
(jaxlm.methods.continual.mixture_laws).

    python tools/fit_mixture_law.py \\
        --run=0.125=runs/mix_0125_50,runs/mix_0125_100,runs/mix_0125 \\
        --run=0.25=runs/mix_0250_50,runs/mix_0250_100,runs/mix_0250 \\
        --run=0.3333=runs/mix_0333_50,runs/mix_0333_100,runs/mix_0333 \\
        --run=0.5=runs/mix_0500_50,runs/mix_0500_100,runs/mix_0500 \\
        --holdout=0.375=runs/mix_0375 --general=wiki --domain=french \\
        [--points=final|curve] [--tolerance=0.01] [--out=plots/mixture_law]

Each --run (and --holdout) is RATIO=MODEL_DIR[,MODEL_DIR...]: runs that continued from the same
checkpoint with that share r of new-domain data (DataConfig.mixture); several MODEL_DIRs at one
ratio are separate runs of different lengths, each trained with its own full learning-rate
schedule. A flag may be repeated. (tools/reproduce.py expands {runs}/ARM to every finished seed
of ARM: seeds of one arm are then replicate points at the same D and r.)

What is fitted (--points=final, the default; D-CPT, Que et al. arXiv:2406.01375, fits L(N, D, r)
to the final validation losses of separate runs, here at one model size N): each run is ONE
point per law, (D, r, L) with
  - L: the run's final loss, eval_final/<name>/loss (logged at the end of a stage on every eval
    batch), or, where the run has none, its last eval/<name>/loss (the small fixed subset
    evaluated during training); the output names the key used for each run;
  - D: the tokens the run trained in its last stage: total/tokens at that final loss minus
    total/tokens at the stage's baseline evaluation (the evaluation at its first step; a run
    restored from another run starts its ledger at 0, so this is its own tokens). The last stage
    starts where jaxlm.reports.runs.stage_starts says, else at the run's first evaluation.
    A final loss logged before the run's last step (an eval/ fallback of a run that did not
    evaluate at its end, or did not finish) is flagged in a note.
The general law is fitted with share 1 - r to eval .../<general>/loss, the domain law with share
r to .../<domain>/loss. The fit needs at least 3 ratios, at least 2 distinct token counts (one
length cannot separate D from r) and at least 6 runs (6 parameters per law).

--points=curve is the earlier behaviour and NOT what D-CPT does: every eval/<name>/loss of each
run's last stage after its baseline is a point. Inside one cosine run those intermediate losses
are not the final loss of a run of that length (the learning rate has not decayed yet).

The general loss before continual pretraining is the baseline evaluation eval/<general>/loss at
the first step of each fitted run's last stage (averaged over the runs). Prints the fitted runs
(tokens, losses, keys), the fitted parameters, each held-out run's predicted and measured final
loss with the relative error (curve: its last eval/ loss), the critical mixture ratio at the
longest fitted run's tokens and the CMR budget law; writes mixture_law.png (final loss against
tokens, a colour per ratio, measured points as markers, held-out runs as open diamonds, fitted
laws as lines) into --out. Bad input is one line on stderr, exit 2.
"""

import argparse
import dataclasses
import os
import sys

import numpy as np

from jaxlm.methods.continual import mixture_laws
from jaxlm.reports import runs as report_runs

KINDS = ("general", "domain")
MIN_RATIOS = 3  # E, C and gamma are the law's ratio-only terms: two ratios cannot separate them.


class LawError(ValueError):
  """Bad input: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # argparse's own errors: one line too.
    raise LawError(message)


@dataclasses.dataclass(frozen=True)
class Final:
  """A run's final point for one law: tokens trained in its last stage, loss, the key used."""
  tokens: float
  loss: float
  key: str
  step: int


@dataclasses.dataclass(frozen=True)
class Run:
  ratio: float
  run_dir: str
  before: float  # eval/<general>/loss at the baseline evaluation of the run's last stage.
  final: dict  # kind -> Final
  curve: dict  # kind -> (tokens, losses): eval/<name>/loss after the baseline, tokens from it.
  last_step: int  # The run's last logged step.

  def share(self, kind: str) -> float:
    return self.ratio if kind == "domain" else 1.0 - self.ratio

  def point(self, kind: str, points: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, losses) this run contributes to the `kind` law."""
    if points == "curve":
      return self.curve[kind]
    f = self.final[kind]
    return np.array([f.tokens]), np.array([f.loss])


def parse_runs(text: str) -> list[tuple[float, str]]:
  """RATIO=DIR[,DIR...] -> [(ratio, dir), ...]."""
  ratio, sep, paths = text.partition("=")
  try:
    value = float(ratio)
  except ValueError:
    value = -1.0
  if not sep or not 0.0 <= value <= 1.0:
    raise LawError(f"--run/--holdout {text!r} must be RATIO=MODEL_DIR[,MODEL_DIR...] with RATIO "
                   "in [0, 1]")
  dirs = paths.split(",")
  if not all(dirs):
    raise LawError(f"--run/--holdout {text!r} has an empty MODEL_DIR (RATIO=DIR[,DIR...])")
  return [(value, d) for d in dirs]


def read_run(ratio: float, run_dir: str, general: str, domain: str) -> Run:
  """One run's baseline, final points and curve (see the module docstring)."""
  try:
    by_step = report_runs.read_metrics(run_dir, x="step")
    by_tokens = report_runs.read_metrics(run_dir, x="tokens")
    starts = report_runs.stage_starts(run_dir)
  except report_runs.ReportError as e:
    raise LawError(str(e)) from None

  def series(key):  # (steps, tokens, values), in step order.
    return (np.asarray(by_step[key][0], np.int64), np.asarray(by_tokens[key][0], np.float64),
            np.asarray(by_step[key][1], np.float64))

  for name in (general, domain):
    if f"eval/{name}/loss" not in by_step:
      have = sorted({k.split("/")[1] for k in by_step
                     if k.startswith("eval/") and k.count("/") == 2})
      raise LawError(f"{run_dir} (ratio {ratio}) logged no eval/{name}/loss; its domains: {have}")
  steps, tokens, losses = series(f"eval/{general}/loss")
  start = starts[-1] if starts else int(steps[0])
  at = np.flatnonzero(steps >= start)
  if at.size == 0:
    raise LawError(f"{run_dir} has no eval/{general}/loss in its last stage (from step {start})")
  base_step, base_tokens, before = int(steps[at[0]]), float(tokens[at[0]]), float(losses[at[0]])

  final, curve = {}, {}
  for kind, name in zip(KINDS, (general, domain)):
    for key in (f"eval_final/{name}/loss", f"eval/{name}/loss"):
      if key in by_step:
        s, t, v = series(key)
        after = np.flatnonzero(s > base_step)
        if after.size:
          i = after[-1]
          final[kind] = Final(float(t[i] - base_tokens), float(v[i]), key, int(s[i]))
          break
    else:
      raise LawError(f"{run_dir} has no evaluation after its first update (step {base_step})")
    s, t, v = series(f"eval/{name}/loss")
    curve[kind] = (t[s > base_step] - base_tokens, v[s > base_step])
    if final[kind].tokens <= 0 or np.any(curve[kind][0] <= 0):
      raise LawError(f"{run_dir}: total/tokens does not grow after its baseline evaluation at "
                     f"step {base_step}")
  last_step = max(max(xs) for xs, _ in by_step.values())
  return Run(ratio, run_dir, before, final, curve, int(last_step))


def read_runs(items: list[str], general: str, domain: str) -> list[Run]:
  return [read_run(ratio, d, general, domain) for item in items for ratio, d in parse_runs(item)]


def check(runs: list[Run], holdout: list[Run], points: str) -> None:
  """The fitted set can determine the law (see the module docstring); no run is given twice."""
  seen = set()
  for run in runs + holdout:
    path = os.path.realpath(run.run_dir)
    if path in seen:
      raise LawError(f"MODEL_DIR {run.run_dir} is given twice (each run is one point)")
    seen.add(path)
  ratios = sorted({r.ratio for r in runs})
  if len(ratios) < MIN_RATIOS:
    raise LawError(f"give at least {MIN_RATIOS} --run ratios to fit (got {len(ratios)}: "
                   f"{', '.join(f'{r:.4g}' for r in ratios) or 'none'})")
  if points == "final":
    for kind in KINDS:
      lengths = sorted({round(r.final[kind].tokens) for r in runs})
      if len(lengths) < 2:
        raise LawError(f"every --run trained {lengths[0]:,} tokens: the law cannot separate D "
                       "from r with one length; add runs of other lengths")
    if len(runs) < len(mixture_laws.NAMES):
      raise LawError(f"give at least {len(mixture_laws.NAMES)} --run runs (one final point each "
                     f"for the law's {len(mixture_laws.NAMES)} parameters; got {len(runs)})")


def fit_points(runs: list[Run], kind: str, points: str):
  """(tokens, shares, losses) the `kind` law is fitted to."""
  tokens, shares, losses = [], [], []
  for run in runs:
    t, loss = run.point(kind, points)
    tokens.append(t), shares.append(np.full_like(t, run.share(kind))), losses.append(loss)
  return np.concatenate(tokens), np.concatenate(shares), np.concatenate(losses)


def fit(runs: list[Run], points: str = "final") -> dict[str, mixture_laws.DcptLaw]:
  return {kind: mixture_laws.fit_dcpt(*fit_points(runs, kind, points)) for kind in KINDS}


def measured(run: Run, kind: str, points: str) -> tuple[float, float]:
  """(tokens, loss) a held-out run is checked at: its final point (curve: last eval/ loss)."""
  t, loss = run.point(kind, points)
  return float(t[-1]), float(loss[-1])


def plot(runs, holdout, laws, names, points: str, out_dir: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  fitted_ratios = {r.ratio for r in runs}
  ratios = sorted({r.ratio for r in runs + holdout})
  colours = {r: plt.get_cmap("viridis")(i / max(len(ratios) - 1, 1) * 0.9)
             for i, r in enumerate(ratios)}
  for ax, kind in zip(axes, KINDS):
    ys, xs = [], []
    for run in runs + holdout:
      t, loss = run.point(kind, points)
      xs.extend(t), ys.extend(loss)
    dense = np.linspace(min(xs) * 0.8, max(xs) * 1.05, 200)
    for ratio in ratios:
      share = ratio if kind == "domain" else 1.0 - ratio
      ax.plot(dense, laws[kind](dense, share), "-" if ratio in fitted_ratios else "--",
              color=colours[ratio], lw=1.2, label=f"r = {ratio:.4g}")
    for run in runs:
      ax.plot(*run.point(kind, points), "o", color=colours[run.ratio],
              ms=6 if points == "final" else 3)
    for run in holdout:
      t, loss = run.point(kind, points)
      ax.plot(t, loss, "D", mfc="none", mec=colours[run.ratio], mew=1.8,
              ms=9 if points == "final" else 4)
    lo, hi = min(ys), max(ys)
    pad = 0.08 * (hi - lo) if hi > lo else 0.01 * abs(hi)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlim(0, max(xs) * 1.05)
    ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
    share = "r" if kind == "domain" else "1 - r"
    what = "final loss of each run" if points == "final" else "every evaluation (curve points)"
    ax.set_title(f"{kind} law: {names[kind]} (share {share}); {what}", fontsize=9)
    ax.set_xlabel("tokens (trained in the run's continual stage)")
    ax.set_ylabel("final eval loss (nats/token)" if points == "final"
                  else "eval loss (nats/token)")
    style = [Line2D([], [], color="grey", marker="o", ls="", label="measured (fitted run)"),
             Line2D([], [], color="grey", marker="D", mfc="none", ls="",
                    label="measured (held-out run)"),
             Line2D([], [], color="grey", ls="-", label="fitted law"),
             Line2D([], [], color="grey", ls="--", label="law at a held-out ratio")]
    ax.legend(handles=ax.get_legend_handles_labels()[0] + style, fontsize=7, ncol=2)
  fig.tight_layout()
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "mixture_law.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def report(runs, holdout, laws, points: str, tolerance: float) -> list[str]:
  if points == "final":
    lines = [f"Fitted to the final loss of each of {len(runs)} runs (one point per run and law, "
             "as D-CPT fits):", "",
             "| ratio | run | tokens | general loss | general key | domain loss | domain key |",
             "|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r.ratio, r.final["general"].tokens)):
      g, d = run.final["general"], run.final["domain"]
      lines.append(f"| {run.ratio:.4g} | {run.run_dir} | {g.tokens:,.0f} | {g.loss:.4f} | {g.key} "
                   f"| {d.loss:.4f} | {d.key} |")
    late = [f"{r.run_dir} (step {f.step} of {r.last_step}, {f.key})" for r in runs + holdout
            for f in {f.step: f for f in r.final.values()}.values() if f.step < r.last_step]
    if late:
      lines += ["", "note: final loss logged before the run's last step: " + "; ".join(late)]
  else:
    n = sum(len(r.curve["general"][0]) for r in runs)
    lines = [f"Fitted to {n} intermediate eval/ losses of {len(runs)} runs (--points=curve; not "
             "what D-CPT does: inside one run the learning rate has not decayed at these points)"]
  lines += ["", "| law | " + " | ".join(mixture_laws.NAMES) + " |",
            "|---|" + "---|" * len(mixture_laws.NAMES)]
  for kind, law in laws.items():
    lines.append(f"| {kind} | " + " | ".join(f"{v:.4g}" for v in law.as_dict().values()) + " |")
  if holdout:
    lines += ["", "| held-out ratio | run | tokens | loss | key | measured (final) | predicted | "
              "relative error |", "|---|---|---|---|---|---|---|---|"]
  for run in sorted(holdout, key=lambda r: (r.ratio, r.final["general"].tokens)):
    for kind in KINDS:
      tokens, loss = measured(run, kind, points)
      key = run.final[kind].key if points == "final" else "last eval/ loss (curve)"
      predicted = float(laws[kind](tokens, run.share(kind)))
      lines.append(f"| {run.ratio:.4g} | {run.run_dir} | {tokens:,.0f} | {kind} | {key} | "
                   f"{loss:.4f} | {predicted:.4f} | {abs(predicted - loss) / loss:.2%} |")
  before = float(np.mean([r.before for r in runs]))
  budget = max(float(fit_points(runs, "general", points)[0].max()), 1.0)
  cmr = mixture_laws.critical_mixture_ratio(laws["general"], budget, before, tolerance)
  lines += ["", f"Critical mixture ratio at {budget:,.0f} tokens (general loss within "
            f"{tolerance:.1%} of {before:.4f}, the baseline before continual pretraining): "
            f"{cmr:.3f}"]
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
  parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run", action="append", default=[],
                      help="RATIO=MODEL_DIR[,MODEL_DIR...]: runs of different lengths (fitted)")
  parser.add_argument("--holdout", action="append", default=[],
                      help="RATIO=MODEL_DIR[,MODEL_DIR...]: held-out runs (predicted, checked)")
  parser.add_argument("--general", required=True, help="the general (old) eval domain")
  parser.add_argument("--domain", required=True, help="the new domain's eval domain")
  parser.add_argument("--points", choices=("final", "curve"), default="final",
                      help="final (default, D-CPT): each run's final loss and tokens; curve: "
                           "every intermediate evaluation (not what D-CPT does)")
  parser.add_argument("--tolerance", type=float, default=0.01,
                      help="relative rise of the general loss the CMR allows")
  parser.add_argument("--out", default=None, help="folder for mixture_law.png")
  try:
    args = parser.parse_args(argv)
    runs = read_runs(args.run, args.general, args.domain)
    holdout = read_runs(args.holdout, args.general, args.domain)
    check(runs, holdout, args.points)
    laws = fit(runs, args.points)
  except (LawError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(report(runs, holdout, laws, args.points, args.tolerance)))
  if args.out:
    names = {"general": args.general, "domain": args.domain}
    print(plot(runs, holdout, laws, names, args.points, args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
