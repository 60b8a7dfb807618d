"""The run's plan, made after the pre-flight checks (jaxlm/training/preflight.py) and before
anything in MODEL_DIR is written: every stage's schedule (given where the one before it, or its restored
run, ended), the checkpoint to resume from and which stage trains first, how many rows of each
source the earlier stages drew, and the first stage's data. It reads and never writes.
"""

import dataclasses
import os

import jax

from jaxlm.checkpointing.checkpoint import Checkpointer, RunRecord
from jaxlm.data.pipeline import Datasets, build_datasets
from jaxlm.errors import UserError
from jaxlm.training.preflight import (check_first_stage, check_fit, check_model_dir, check_stage,
                             check_stage_names, check_transitions, check_vocab, stage_index_of,
                             tree_bytes)
from jaxlm.checkpointing.restore import source_data_position, stage_source_learning_rate
from jaxlm.training.stages import Stage, continue_rows, stage_schedules, stage_starts
from jaxlm.training.train_step import abstract_state


@dataclasses.dataclass(frozen=True)

class ResumePoint:
  step: int
  stage_index: int
  record: RunRecord



@dataclasses.dataclass

class Plan:
  """What the checks found: every stage's schedule, which stage trains first, and its data.
  (The restore finds the checkpoint again, and sets aside any newer one that does not read.)"""
  schedules: list  # Each stage's, given where the one before it (or its restored run) ended.
  first_stage: int | None  # None: every stage is already done.
  datasets: Datasets | None  # Built for `first_stage`.
  rows_before: dict[str, int] | None = None  # Rows of each source drawn before `first_stage`.



def plan_run(model_dir: str, stages: list[Stage], microbatches: int, mesh, rules,
             eval_domains=()) -> Plan:
  """Every check of jaxlm/training/preflight.py, then the plan. Run inside the run's mesh and
  logical-axis rules (the model is traced). `eval_domains`: EvalConfig.domains, evaluated in
  every stage."""
  check_stage_names(stages)
  check_first_stage(stages[0])
  states = [abstract_state(stage) for stage in stages]  # Traced once, used by every check.
  for stage, state in zip(stages, states):
    check_stage(stage, state, microbatches, mesh, rules, eval_domains)
  check_transitions(stages, states)
  schedules = stage_schedules(stages, stage_source_learning_rate)
  check_model_dir(model_dir, max(tree_bytes(state) for state in states))
  resume = find_resume_point(model_dir, stages)
  starts = stage_starts(stages)
  first = 0 if resume is None else resume.stage_index
  if resume is not None and resume.step >= starts[first] + stages[first].num_steps:
    first += 1  # The checkpoint ends its stage; the next one starts from it.
  if first >= len(stages):
    return Plan(schedules, None, None)
  rows_before = {}  # The data position of every source, as the checkpoint record kept it.
  if resume is not None:
    data = resume.record.data
    rows_before = data.rows_before_stage if first == resume.stage_index else data.rows_after_stage
  elif stages[0].restore_from is not None and stages[0].restore_from.continue_data:
    rows_before = branched_data_position(stages[0])
  return Plan(schedules, first, build_stage_data(stages[first], rows_before, eval_domains),
              rows_before)



def branched_data_position(stage: Stage) -> dict[str, int]:
  """Rows of each source the restored run had drawn at its checkpoint, counted through this
  stage's data (the same DataConfig reads the same rows)."""
  rows_before, stage_step = source_data_position(stage.restore_from)
  if not stage_step:
    return rows_before
  return build_stage_data(stage, rows_before).train.rows_drawn(stage_step)



def build_stage_data(stage: Stage, rows_before: dict[str, int], eval_domains=()) -> Datasets:
  """This host's data for `stage`, each source continuing after `rows_before` unless the stage
  restarts it, and the eval sets of its sources and of `eval_domains`."""
  with stage.scope():
    datasets = build_datasets(stage.data, shard_index=jax.process_index(),
                              shard_count=jax.process_count(),
                              start_rows=continue_rows(rows_before, stage),
                              eval_domains=eval_domains)
  check_vocab(stage, datasets.tokenizer)
  return datasets



def find_resume_point(model_dir: str, stages: list[Stage]) -> ResumePoint | None:
  """The newest checkpoint whose record and tensor metadata read back, checked against the
  stages. Newer ones that do not read are skipped here; the restore sets them aside."""
  if not os.path.isdir(os.path.join(model_dir, "checkpoints")):
    return None
  checkpointer = Checkpointer(model_dir, read_only=True)
  try:
    for step in reversed(checkpointer.all_steps()):
      try:
        record = checkpointer.restore_record(step)
        saved = checkpointer.saved_shapes(step)
      except UserError:
        raise
      except Exception:  # pylint: disable=broad-except  (orbax raises many types)
        continue  # Reported once, when the restore sets it aside.
      index = stage_index_of(record, step, checkpointer.directory)
      check_fit(step, index, saved, stages, checkpointer.directory)
      return ResumePoint(step, index, record)
  finally:
    checkpointer.close()
  return None
