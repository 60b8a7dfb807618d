"""Everything one stage trains with, built when it starts: its first state (fresh, handed over
from the previous stage through its transitions, and/or restored from another run), its data,
its jitted steps, its evaluation sets on the devices, and its cost per step."""

import dataclasses
import logging
import warnings
from typing import Any, Callable

import jax

from jaxlm import parallel
from jaxlm.evaluation import held_out
from jaxlm.model import flops
from jaxlm.data.pipeline import TrainBatches
from jaxlm.model import count_params
from jaxlm.checkpointing.restore import restore_into
from jaxlm.training.stages import (Stage, check_transition_result, hand_over, restored_stage,
                                   transition_context)
from jaxlm.training.train_step import (TrainState, abstract_state, make_eval_step,
                                       make_params_for_eval, make_train_step, sharded_init,
                                       state_shardings)

log = logging.getLogger("jaxlm")


@dataclasses.dataclass
class StageSetup:
  index: int
  stage: Stage
  start: int  # The global step the stage begins at ...
  end: int  # ... and ends at.
  train: TrainBatches
  tokenizer: Any
  train_step: Callable  # (state, batch) -> (state, metrics)
  eval_step: Callable  # (params, batch) -> (summed nats, targets)
  params_for_eval: Callable  # state -> the params the model is evaluated with
  eval_sets: dict[str, held_out.EvalSet]
  tokens_per_step: int
  flops_per_step: float

  def evaluate(self, state: TrainState, final: bool = False) -> dict[str, float]:
    """eval/... on each domain's fixed subset; `final` (a stage's end) adds eval_final/..."""
    return held_out.evaluate(self.eval_step, self.params_for_eval(state), self.eval_sets, final)


def build_stage(index: int, stage: Stage, start: int, datasets, shardings: TrainState,
                batch_sharding, microbatches: int, to_device, schedule=None) -> StageSetup:
  """`datasets`: the stage's data (run_plan.build_stage_data); `to_device` places a host
  batch that every process holds whole; `schedule`: the stage's (stages.stage_schedules)."""
  data = stage.data
  eval_sets = held_out.place_eval_sets(datasets.eval, datasets.tokenizer.byte_lengths(),
                                       to_device, data.max_eval_batches)
  tokens_per_step = data.batch_size * data.seq_len
  return StageSetup(
      index=index, stage=stage, start=start, end=start + stage.num_steps, train=datasets.train,
      tokenizer=datasets.tokenizer,
      train_step=make_train_step(stage, shardings, batch_sharding, microbatches,
                                 stage_start=start, schedule=schedule),
      eval_step=make_eval_step(stage, shardings.params, batch_sharding),
      params_for_eval=make_params_for_eval(stage, start), eval_sets=eval_sets,
      tokens_per_step=tokens_per_step,
      flops_per_step=flops.flops_per_token(stage.model, data.seq_len) * tokens_per_step)


def first_state(stages: list[Stage], index: int, state: TrainState | None,
                shardings: TrainState, seed: int, model_dir: str, mesh=None,
                rules=None) -> TrainState:
  """The state stage `index` starts from: fresh (state None), else the previous stage's final
  state through this stage's transitions (one jit, out_shardings = this stage's); then any
  tensors this stage restores from another run (`Stage.restore_from`). A first stage with
  transitions applies them to what it restores (`restored_stage`; mesh and rules place it)."""
  stage = stages[index]
  previous = stages[index - 1] if index > 0 else restored_stage(stage)
  restored_first = index == 0 and previous is not None
  if state is None and previous is None:
    state = sharded_init(stage, shardings, jax.random.key(seed))
  elif state is None:
    source_shardings = state_shardings(previous, mesh, rules)
    state = sharded_init(previous, source_shardings, jax.random.key(seed))
    state, _ = restore_into(stage.restore_from, state, previous.make_optimizer(), model_dir)
  if previous is not None:
    log.info("stage transition %r -> %r via %s", previous.name, stage.name,
             " then ".join(stage.transition_names))
    ctx = transition_context(previous, stage, None, shardings)
    rng = jax.random.fold_in(jax.random.key(seed), index)
    step = lambda s, r: hand_over(s, dataclasses.replace(ctx, rng=r))
    check_transition_result(jax.eval_shape(step, state, rng), abstract_state(stage), ctx)
    with warnings.catch_warnings():  # Leaves that change shape cannot reuse their buffers.
      warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
      state = jax.jit(step, out_shardings=shardings, donate_argnums=0)(state, rng)
  if stage.restore_from is not None and not restored_first:
    state, _ = restore_into(stage.restore_from, state, stage.make_optimizer(), model_dir)
  return state


def describe(setup: StageSetup, state: TrainState, peak_flops: float) -> str:
  return (f"stage {setup.stage.name!r}: steps {setup.start}..{setup.end}, "
          f"{count_params(state.params):,} params ({parallel.per_device_bytes(state):,} bytes "
          f"per device with optimizer and method state), "
          f"{setup.flops_per_step / setup.tokens_per_step:.3g} model FLOPs/token, peak "
          f"{peak_flops:.3g} FLOP/s/device")
