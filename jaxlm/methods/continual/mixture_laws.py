"""Mixture laws for continual pretraining: how the general and the domain loss depend on the
share r of new-domain data and on the tokens trained, fitted with scipy from a sweep of runs.

D-CPT law (Que et al., arXiv:2406.01375), at one model size (its A/N^alpha term is then a
constant folded into E). With s the share of the loss's own data (s = r for the domain loss,
s = 1 - r for the general loss) and D the continual-pretraining tokens:

    L(D, s) = E + B * s**eta / D**beta + C / (s + eps)**gamma          (eps = 1e-2, fixed)

CMR (Gu et al., arXiv:2407.17467): the critical mixture ratio at a budget D is the largest r
whose general loss stays within `tolerance` of its value before continual pretraining; Gu et al.
find it grows with the budget as R_CMR(D) = b0 + b1 * D**s. Our reading (the paper does not
restate its per-ratio fits): the general and domain losses come from the fitted D-CPT laws, the
CMR is that constrained maximum on a fine grid of r, and the budget law is fitted to the CMRs of
several budgets.
"""

import dataclasses
import itertools

import numpy as np
from scipy import optimize

EPS = 1e-2  # D-CPT's r' = r + eps keeps C / r'**gamma finite at r = 0.
NAMES = ("E", "B", "eta", "beta", "C", "gamma")


@dataclasses.dataclass(frozen=True)
class DcptLaw:
  """L(D, s) = E + B * s**eta / D**beta + C / (s + eps)**gamma (tokens D in millions)."""
  E: float
  B: float
  eta: float
  beta: float
  C: float
  gamma: float

  def __call__(self, tokens, share):
    d = np.asarray(tokens, np.float64) / 1e6
    s = np.asarray(share, np.float64)
    with np.errstate(divide="ignore"):  # s = 0 with eta < 0: that data is absent, loss inf.
      return self.E + self.B * s ** self.eta / d ** self.beta + self.C / (s + EPS) ** self.gamma

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def fit_dcpt(tokens, share, loss) -> DcptLaw:
  """Least squares on the log of the loss (Huber, as D-CPT fits) from a grid of starting points;
  E, B, C, beta, gamma are kept non-negative."""
  tokens, share, loss = (np.asarray(x, np.float64) for x in (tokens, share, loss))
  if not (tokens.shape == share.shape == loss.shape) or tokens.size < len(NAMES):
    raise ValueError(f"need at least {len(NAMES)} (tokens, share, loss) points of one shape")
  if np.any(tokens <= 0) or np.any(loss <= 0) or np.any((share < 0) | (share > 1)):
    raise ValueError("tokens and losses must be positive and shares in [0, 1]")

  def residuals(p):
    return np.log(DcptLaw(*p)(tokens, share)) - np.log(loss)

  low = [0.0, 0.0, -3.0, 0.0, 0.0, 0.0]
  high = [np.inf, np.inf, 3.0, 3.0, np.inf, 3.0]
  best = None
  floor = float(loss.min())
  for e, eta, beta, gamma in itertools.product((0.5 * floor, 0.9 * floor), (-0.5, 0.5),
                                               (0.2, 0.6), (0.1, 0.5)):
    start = [e, 0.5 * floor, eta, beta, 0.05 * floor, gamma]
    try:
      result = optimize.least_squares(residuals, start, bounds=(low, high), loss="huber",
                                      f_scale=1e-2, max_nfev=4000)
    except ValueError:  # A start whose model is not finite at some point.
      continue
    if np.all(np.isfinite(result.fun)) and (best is None or result.cost < best.cost):
      best = result
  if best is None:
    raise ValueError("the D-CPT law could not be fitted to these points")
  return DcptLaw(*(float(p) for p in best.x))


def critical_mixture_ratio(general: DcptLaw, tokens: float, general_before: float,
                           tolerance: float) -> float:
  """The largest domain share r (on a 1/1000 grid) whose predicted general loss after `tokens`
  stays within `tolerance` (relative) of `general_before`; 0 if none does."""
  ratios = np.linspace(0.0, 1.0, 1001)
  ok = general(tokens, 1.0 - ratios) <= general_before * (1.0 + tolerance)
  return float(ratios[ok].max()) if ok.any() else 0.0


def fit_cmr_budget_law(budgets, cmrs) -> tuple[float, float, float]:
  """(b0, b1, s) of R_CMR(D) = b0 + b1 * D**s (D in millions of tokens)."""
  d = np.asarray(budgets, np.float64) / 1e6
  r = np.asarray(cmrs, np.float64)
  params, _ = optimize.curve_fit(lambda x, b0, b1, s: b0 + b1 * x ** s, d, r, p0=(0.0, 0.1, 0.3),
                                 maxfev=20000)
  return tuple(float(p) for p in params)
