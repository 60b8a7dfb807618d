"""Per-layer density for an overall target density: uniform, or ERK (Erdős–Rényi-Kernel, Evci
et al. 1911.11134 §3, after Mocanu et al. 1707.04780).

ERK gives layer l density proportional to (n_in + n_out) / (n_in * n_out) (a matrix seen as its
input by its output dimensions), so small layers stay denser: density_l = eps * r_l with eps
chosen so the kept weights total density * all weights. A layer whose density_l would exceed 1 is
made dense and eps is solved again over the rest (jaxpruner's and RigL's re-solve). Every
density is in (0, 1], and 1 for every layer at density 1."""

import numpy as np

from jaxlm.errors import UserError

DISTRIBUTIONS = ("uniform", "erk")


def check_density(name: str, density) -> None:
  if not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
    raise UserError(f"{name}={density!r} must be in (0, 1] (the fraction of weights kept)")


def layer_densities(shapes: dict[str, tuple[int, int]], density: float,
                    distribution: str = "uniform") -> dict[str, float]:
  """{name: density} for matrices of (n_in, n_out) `shapes`."""
  check_density("density", density)
  if distribution not in DISTRIBUTIONS:
    raise UserError(f"sparsity distribution {distribution!r}; choose one of {list(DISTRIBUTIONS)}")
  if distribution == "uniform":
    return {name: float(density) for name in shapes}
  sizes = {n: float(a * b) for n, (a, b) in shapes.items()}
  ratio = {n: (a + b) / (a * b) for n, (a, b) in shapes.items()}
  budget = density * sum(sizes.values())
  dense: set[str] = set()
  while True:
    rest = [n for n in shapes if n not in dense]
    if not rest:  # Density 1 (or a hair below): every layer over 1 by a rounding error.
      return {n: 1.0 for n in shapes}
    epsilon = (budget - sum(sizes[n] for n in dense)) / sum(ratio[n] * sizes[n] for n in rest)
    over = [n for n in rest if epsilon * ratio[n] > 1.0]
    if not over:
      return {n: 1.0 if n in dense else epsilon * ratio[n] for n in shapes}
    dense.add(max(over, key=lambda n: ratio[n]))


def kept_counts(densities: dict[str, float], sizes: dict[str, int]) -> dict[str, int]:
  """Whole weights kept per layer (at least one)."""
  return {n: max(1, int(np.rint(densities[n] * sizes[n]))) for n in densities}
