"""Model growth: start a larger model from a trained smaller one (docs/methods.md, part B).

Pure functions on param pytrees, exact where the mathematics is exact, each citing its paper:
width.py (bert2BERT FPI/AKI, head copies, exact d_model), depth.py (G_stack, interleave,
identity insertion), msg.py (masked structural growth), ligo.py (learned growth operators),
upcycling.py (dense MLPs into mixture-of-experts layers), subcloning.py (large -> small), and
the stage transitions that apply them (transitions.py).
GrowLength is a sequence-length schedule across stages (DataConfig.seq_len per stage; see
experiments/growth/growlength.gin).
"""

# Importing registers the transitions (grow_width, grow_depth, msg_grow, ligo_grow, upcycle)
# and the gin configurables (msg, ligo).
from jaxlm.methods.growth import ligo, msg, transitions, upcycling  # noqa: F401
