"""optax's own optimizers as gin factories, for tests that run them through the command line (a
gin file says `import optax_optimizers`), as a user's module would add them."""

import gin
import optax


@gin.configurable
def optax_adafactor(schedule):
  return optax.adafactor(schedule, min_dim_size_to_factor=8)


@gin.configurable
def optax_galore(schedule):
  return optax.contrib.galore(schedule, rank=4, update_proj_gap=3)


@gin.configurable
def optax_muon(schedule):
  return optax.contrib.muon(schedule)
