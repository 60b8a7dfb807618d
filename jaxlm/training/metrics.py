"""Where training metrics go: a JSON-lines file, TensorBoard event files, and the terminal
(a progress bar on a TTY, periodic log lines otherwise). Only process 0 writes."""

import json
import logging
import math
import os
import sys

import jax
import tqdm

log = logging.getLogger("jaxlm")
PROGRESS_MODES = ("auto", "bar", "log")  # A bar on a terminal, always a bar, always log lines.


class MetricsWriter:
  """Appends `{"step": s, name: value, ...}` lines to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, model_dir: str, tensorboard: bool = True, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    if not self.enabled:
      return
    path = os.path.join(model_dir, "metrics.jsonl")
    _drop_records_after(path, resume_step or 0)
    self._jsonl = open(path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # Imported lazily: it pulls in protobuf.
      self._tb = SummaryWriter(os.path.join(model_dir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in clean.items():
        if math.isfinite(value):
          self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def _drop_records_after(path: str, step: int) -> None:
  """On resume, forget what a killed run logged past its last checkpoint (and any line it was
  cut off in), so the log reads as if the run had never stopped."""
  if not os.path.exists(path):
    return
  kept = []  # (record, line)
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
        if record["step"] <= step:
          kept.append((record, line if line.endswith("\n") else line + "\n"))
      except (ValueError, KeyError):
        pass  # A partial last line from a killed process.
  # A stage that started at `step` (its data proportions, then its baseline evaluation) is
  # started again by the resumed run: its first records go too, or they would appear twice.
  starts = [i for i, (record, _) in enumerate(kept) if record["step"] == step
            and any(k.startswith("data/proportion/") for k in record)]
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(line for _, line in kept[:starts[0] if starts else len(kept)])
  os.replace(path + ".tmp", path)


class Progress:
  """A tqdm bar (step, loss, tokens/s, ETA) on a terminal; plain log lines when piped."""

  def __init__(self, total_steps: int, start_step: int, mode: str = "auto"):
    use_bar = {"auto": sys.stderr.isatty(), "bar": True, "log": False}[mode]  # PROGRESS_MODES
    self._bar = None
    if use_bar and jax.process_index() == 0:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, smoothing=0.1)

  def advance(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def report(self, step: int, scalars: dict[str, float]) -> None:
    shown = {k: v for k, v in scalars.items() if k in _SHOWN}
    text = " ".join(_SHOWN[k].format(v) for k, v in shown.items())
    if self._bar is not None:
      self._bar.set_postfix_str(text, refresh=False)
    elif jax.process_index() == 0:
      log.info("step %d %s", step, text)

  def message(self, text: str) -> None:
    if self._bar is not None:
      self._bar.write(text)
    elif jax.process_index() == 0:
      log.info("%s", text)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


_SHOWN = {
    "train/loss": "loss={:.3f}",
    "perf/tokens_per_sec": "tok/s={:,.0f}",
    "perf/mfu": "mfu={:.1%}",
}
