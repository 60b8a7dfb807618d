"""Every configurable checks its values when built (jaxlm/validation.py), naming the binding and
the allowed range; good values pass through unchanged."""

import math

import numpy as np
import pytest

from jaxlm.data.pipeline import DataConfig
from jaxlm.errors import UserError
from jaxlm.kernels.flash_attention import FlashBlockSizes
from jaxlm.model import ModelConfig
from jaxlm.optim.optimizers import adamw
from jaxlm.optim.schedules import warmup_constant, warmup_cosine
from jaxlm.parallel import DistributedConfig, MeshConfig
from jaxlm.checkpointing.restore import RestoreConfig
from jaxlm.training.stages import Stage
from jaxlm.training.cadence import nonfinite_cause
from jaxlm.training.trainer import TrainerConfig
from jaxlm.validation import check_range


@pytest.mark.parametrize("build, message", [
    (lambda: TrainerConfig(microbatches=0), "TrainerConfig.microbatches must be an integer in [1, inf)"),
    (lambda: TrainerConfig(checkpoint_every_secs=-1.0), "TrainerConfig.checkpoint_every_secs must be a number in (0, inf) or None"),
    (lambda: TrainerConfig(max_consecutive_nonfinite=-1), "TrainerConfig.max_consecutive_nonfinite must be"),
    (lambda: TrainerConfig(tensorboard="yes"), "TrainerConfig.tensorboard must be True or False, got 'yes'"),
    (lambda: TrainerConfig(sample_temperature=math.nan), "TrainerConfig.sample_temperature must be"),
    (lambda: Stage(num_steps=2.5), "Stage.num_steps must be an integer, got 2.5 (float)"),
    (lambda: Stage(num_steps=0), "Stage.num_steps (stage 'pretrain') must be an integer in [1, inf)"),
    (lambda: Stage(optimizer=3), "Stage.optimizer (stage 'pretrain') must be a factory"),
    (lambda: ModelConfig(d_model="128"), "ModelConfig.d_model must be an integer, got '128' (str)"),
    (lambda: ModelConfig(rope_theta=-1.0), "ModelConfig.rope_theta must be a number in (0, inf)"),
    (lambda: ModelConfig(num_layers=True), "ModelConfig.num_layers must be an integer, got True"),
    (lambda: DataConfig(valid_fraction=1.0), "DataConfig.valid_fraction must be a number in (0, 1)"),
    (lambda: DataConfig(eval_batch_size=0), "DataConfig.eval_batch_size must be"),
    (lambda: MeshConfig(fsdp="2"), "MeshConfig.fsdp must be an integer"),
    (lambda: MeshConfig(rules="nope"), "unknown rule set 'nope'"),
    (lambda: DistributedConfig(num_processes=0), "DistributedConfig.num_processes must be"),
    (lambda: RestoreConfig(path="/x", step=-1), "RestoreConfig.step must be"),
    (lambda: RestoreConfig(path="/x", assignment_map=(("layer_(", None),)), "is not a regular expression"),
    (lambda: FlashBlockSizes(block_q=0), "FlashBlockSizes.block_q must be"),
    (lambda: adamw(lambda _: 1e-3, eps=0.0), "adamw.eps must be a number in (0, inf)"),
    (lambda: adamw(lambda _: 1e-3, grad_clip_norm=math.inf), "adamw.grad_clip_norm must be"),
    (lambda: warmup_cosine(100, final_lr_fraction=1.5), "warmup_cosine.final_lr_fraction must be a number in [0, 1]"),
    (lambda: warmup_cosine(100, warmup_steps=200), "warmup_cosine.warmup_steps=200 must be at most"),
    (lambda: warmup_constant(100, peak_lr=math.nan), "warmup_constant.peak_lr must be"),
])
def test_bad_values_name_the_binding_and_the_range(build, message):
  with pytest.raises(UserError) as raised:
    build()
  assert message in str(raised.value).splitlines()[0]


def test_good_values_pass():
  assert TrainerConfig(keep_checkpoints=None, checkpoint_every=None, progress="log").progress == "log"
  assert ModelConfig(rope_theta=500_000).rope_theta == 500_000  # An int is a fine float.
  assert DataConfig(eval_batch_size=None).eval_batch_size is None
  assert adamw(lambda _: 1e-3, b1=0.0, weight_decay=0.0, grad_clip_norm=None) is not None
  check_range("x", 1.0, low=0, high=1)  # Closed ends include their bounds.
  with pytest.raises(UserError, match=r"x must be a number in \[0, 1\), got 1.0"):
    check_range("x", 1.0, low=0, high=1, high_open=True)


@pytest.mark.parametrize("loss, grad_norm, cause", [
    (np.nan, np.nan, "non-finite loss"),
    (2.0, np.inf, "non-finite gradients"),
    (2.0, 1.5, "the optimizer update overflowed (loss and gradients were finite)"),
])
def test_a_skipped_step_names_its_cause(loss, grad_norm, cause):
  assert nonfinite_cause({"train/loss": loss, "train/grad_norm": grad_norm,
                          "train/nonfinite": 1.0}) == cause
