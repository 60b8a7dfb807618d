"""optax's own optimizers as gin factories, for tests that run them through the command line (a
gin file says `import optax_optimizers`), as a user's module would add them. GaLore and Muon
are jaxlm's own factories (`@galore`, `@muon`)."""

import gin
import optax


@gin.configurable
def optax_adafactor(schedule):
  return optax.adafactor(schedule, min_dim_size_to_factor=8)

