"""Preemption: SIGTERM or SIGINT asks the trainer to checkpoint at the next step boundary and
exit with EXIT_PREEMPTED; a second signal exits at once. The last complete checkpoint is never
at risk: orbax only renames a checkpoint into place once it is fully written."""

import logging
import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("jaxlm")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" -- restart the same command to resume.
EXIT_FORCED = 130  # A second signal: no final checkpoint (the previous complete one stands).


class PreemptionGuard:
  """A context manager that turns the first SIGTERM/SIGINT into a flag the loop polls."""

  def __init__(self):
    self._requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self._requested:
      os.write(2, b"jaxlm: second signal, exiting now without a final checkpoint\n")
      os._exit(EXIT_FORCED)  # pylint: disable=protected-access
    self._requested = True
    log.warning("received %s: will checkpoint at the next step boundary and exit "
                "(signal again to exit at once)", signal.Signals(signum).name)

  def requested(self) -> bool:
    """Whether to stop now; in a multi-process run, whether any process was signalled (all
    processes must agree, since the final checkpoint is collective)."""
    if jax.process_count() == 1:
      return self._requested
    flags = multihost_utils.process_allgather(np.array(self._requested))
    return bool(np.any(flags))
