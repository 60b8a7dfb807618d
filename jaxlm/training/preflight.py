"""Pre-flight: everything a run can be refused for, checked before anything in MODEL_DIR is
written, moved or truncated (issue 11). It reads and never writes:

  1. every stage: its optimizer and schedule are built (the factories check their values), its
     sequence length, tokenizer, batch split and attention implementation are checked, its model
     is traced once, and its `restore_from` source is read and matched against the model;
  2. MODEL_DIR: a directory that can be written, with room for one more checkpoint;
  3. the checkpoints already in MODEL_DIR: the newest that reads must fit this run (its stage
     and step, and every tensor's shape); one that does not fit is a configuration error, never
     corruption. Only checkpoints that cannot be read are left for the restore to set aside;
  4. the data of the stage that trains first is built (jaxlm/training/run_plan.py, after these
     checks: a missing or empty corpus fails there).

Configurable values themselves are checked where they are built (jaxlm/validation.py), which
gin does before `run` starts. Only after the checks and the plan (run_plan.plan_run) does
`trainer.run` write config.gin, open the checkpointer and the metrics, and restore.
"""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import parallel
from jaxlm.checkpointing.checkpoint import RunRecord
from jaxlm.data.pipeline import check_sources
from jaxlm.data.tokenizers import resolve_tokenizer
from jaxlm.errors import UserError
from jaxlm.model import forward
from jaxlm.checkpointing.restore import check_restore_source
from jaxlm.training.stages import (Stage, check_transition_result, hand_over, restored_stage,
                                   stage_starts, transition_context)
from jaxlm.methods.transition import identity
from jaxlm.training.train_step import abstract_state, state_shardings
from jaxlm.tree_names import first_difference, shapes_of

FIX_MISMATCH = ("use a new MODEL_DIR, restore the config it was trained with (its config.gin), "
                "or start from it with Stage.restore_from")


def check_stage(stage: Stage, state, microbatches: int, mesh, rules, eval_domains=()) -> None:
  """Everything about one stage that needs neither its data nor MODEL_DIR; `state` is its
  abstract train state (whose tracing ran the optimizer factory's own checks)."""
  stage.make_schedule()  # warmup_cosine(...) checks its values.
  cfg, data = stage.model, stage.data
  cfg.check_seq_len(data.seq_len)
  batch_devices = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
  if data.batch_size % (microbatches * batch_devices):
    raise UserError(f"stage {stage.name!r}: DataConfig.batch_size={data.batch_size} must "
                    f"divide into TrainerConfig.microbatches={microbatches} x {batch_devices} "
                    "data-parallel devices")
  with stage.scope():
    check_vocab(stage, resolve_tokenizer(data.tokenizer))
    # Sources resolve and the mixture names only them; no text is read.
    names = check_sources(data, eval_domains)
  unknown = sorted(set(stage.restart_sources) - {"*", *names})
  if unknown:
    raise UserError(f"stage {stage.name!r}: Stage.restart_sources names {unknown}, which the "
                    f"stage does not read (its sources: {names}); use those names or ['*']")
  state_shardings(stage, mesh, rules)  # Every sharded dimension divides its mesh axes.
  # Tracing the forward pass checks the attention implementation and every shape, compiling
  # nothing.
  tokens = jax.ShapeDtypeStruct((1, data.seq_len), jnp.int32)
  jax.eval_shape(lambda p, t: forward(p, cfg, t), state.params, tokens)
  if stage.restore_from is not None:
    source = restored_stage(stage)  # A first stage's transitions start from what it restores.
    try:
      check_restore_source(stage.restore_from, abstract_state(source) if source else state,
                           (source or stage).make_optimizer())
    except UserError as e:
      if source is None or stage.restore_from.model is not None:
        raise
      raise UserError(f"{e}; stage {stage.name!r}'s transitions start from the restored model: "
                      "bind RestoreConfig.model to the model the source holds "
                      "(@source/ModelConfig())") from None


def check_vocab(stage: Stage, tokenizer) -> None:
  if tokenizer.vocab_size > stage.model.vocab_size:
    raise UserError(f"stage {stage.name!r}: the tokenizer has {tokenizer.vocab_size} ids but "
                    f"ModelConfig.vocab_size={stage.model.vocab_size}; raise vocab_size")


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _nearest_existing(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def check_model_dir(model_dir: str, checkpoint_bytes: int) -> None:
  """MODEL_DIR (or the folder it will be made in) is a writable directory with room for one
  more checkpoint. Creates nothing."""
  existing = _nearest_existing(model_dir)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    problem = "is not a directory" if not os.path.isdir(existing) else "is not writable"
    raise UserError(f"MODEL_DIR {model_dir!r} is not writable ({existing!r} {problem}); choose "
                    "another --gin.MODEL_DIR")
  free = shutil.disk_usage(existing).free
  if free < checkpoint_bytes:
    raise UserError(f"MODEL_DIR {model_dir!r} has {free / 2**20:,.1f} MiB free but one "
                    f"checkpoint needs about {checkpoint_bytes / 2**20:,.1f} MiB; free space or "
                    "choose another --gin.MODEL_DIR")


def stage_index_of(record: RunRecord, step: int, where: str) -> int:
  """The stage the checkpoint was written in; a converted checkpoint has none to resume."""
  if record.is_conversion:
    raise UserError(f"the checkpoint at step {step} in {where} was converted from "
                    f"{record.converted_from!r} (params only), so it is a restore source, not a "
                    "run to resume: train in a new MODEL_DIR with Stage.restore_from = "
                    "@RestoreConfig() and RestoreConfig.path naming this directory")
  return record.stage_index


def check_fit(step: int, index: int, saved: dict, stages: list[Stage], where: str) -> None:
  """The checkpoint at `step` (written in stage `index`) can resume this run: its step lies in
  that stage and every tensor this run's stage needs is there, with the same shape."""
  starts = stage_starts(stages)
  if index >= len(stages) or not starts[index] <= step <= starts[index] + stages[index].num_steps:
    bounds = ", ".join(f"{s.name!r} {a}..{a + s.num_steps}" for s, a in zip(stages, starts))
    raise UserError(f"the checkpoint at step {step} in {where} (stage {index}) does not fit this "
                    f"run's stages ({bounds}); {FIX_MISMATCH}")
  # Zero-size arrays are not saved (checkpoint.without_empty).
  wanted = {n: s for n, s in shapes_of(abstract_state(stages[index])).items() if math.prod(s)}
  difference = first_difference(saved, wanted, "there", "here")
  if difference:
    raise UserError(f"the checkpoint at step {step} in {where} does not fit this config: "
                    f"{difference}; {FIX_MISMATCH}")


def check_transitions(stages: list[Stage], states: list | None = None) -> None:
  """Each stage's hand-over (its transitions, then optimizer and method state), run on abstract
  shapes, gives exactly the stage's train state, so a later stage's mistake fails at start-up.
  `states`: the stages' abstract train states, if already traced."""
  states = states or [abstract_state(stage) for stage in stages]
  source = restored_stage(stages[0])
  if source is not None:  # The first stage's transitions apply to what it restores.
    stages, states = [source, *stages], [abstract_state(source), *states]
  for previous, stage, before, after in zip(stages, stages[1:], states, states[1:]):
    ctx = transition_context(previous, stage, jax.random.key(0))  # Only shapes matter here.
    result = jax.eval_shape(lambda state, ctx=ctx: hand_over(state, ctx), before)
    check_transition_result(result, after, ctx)


def check_first_stage(stage: Stage) -> None:
  """A transition maps the previous stage's state: the first stage has none to map unless it
  restores another run (then its transitions apply to what it restores)."""
  if stage.transition != (identity,) and stage.restore_from is None:
    raise UserError(f"stage {stage.name!r} is the first stage, so its transition "
                    f"{stage.transition_names} has nothing to map; scope it to a later stage "
                    f"(later/Stage.transition = ...) or start the stage from another run with "
                    f"Stage.restore_from (its transitions then apply to what it restores)")


def check_stage_names(stages: list[Stage]) -> None:
  names = [stage.name for stage in stages]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise UserError(f"several stages are named {repeated[0]!r} ({names}); give each its own gin "
                    "scope (run.stages = [@warm/Stage(), @anneal/Stage()]) or Stage.name")
