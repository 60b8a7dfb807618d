"""The compute ledger: training FLOPs and tokens summed over every stage of a run, each stage
counted with its own model, so arms of a comparison can be plotted at equal compute.

It is logged with every metric (total/flops, total/tokens) and kept in the checkpoint record,
so a resumed run continues the sums. Skipped (non-finite) steps still count: their compute was
spent. A stage's cost per step is `flops.flops_per_token(model) x tokens per step`, counted from
the matrices the model's anatomy lists; it is dense-equivalent (a sparse method's zeros are not
subtracted: dense kernels do not skip them).
"""

import dataclasses


@dataclasses.dataclass
class ComputeLedger:
  flops: float = 0.0
  tokens: int = 0

  def add_steps(self, steps: int, flops_per_step: float, tokens_per_step: int) -> None:
    self.flops += steps * flops_per_step
    self.tokens += steps * tokens_per_step

  def metrics(self) -> dict[str, float]:
    return {"total/flops": self.flops, "total/tokens": float(self.tokens)}

  def record(self) -> dict:
    return {"flops": self.flops, "tokens": self.tokens}

  @classmethod
  def from_record(cls, record: dict | None) -> "ComputeLedger":
    record = record or {}
    return cls(float(record.get("flops", 0.0)), int(record.get("tokens", 0)))
