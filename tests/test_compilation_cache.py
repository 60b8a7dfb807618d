"""The persistent compilation cache of the command-line entry points
(jaxlm/training/compilation_cache.py)."""

import json
import os
import subprocess
import sys

import pytest

from jaxlm.errors import UserError
from jaxlm.training import compilation_cache

# A process that turns the cache on as the entry points do, compiles one program and prints the
# folder used and how many of its compilations were loaded from the cache. The threshold is
# lowered so that this small program is written at all.
PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from jaxlm.training import compilation_cache
hits = []
jax.monitoring.register_event_listener(
    lambda name, **_: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
path = compilation_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None)
bounds = [jax.config.jax_compilation_cache_max_size,
          jax.config.jax_persistent_cache_min_compile_time_secs]
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
value = float(jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.arange(64.0).reshape(8, 8) / 64))
print(json.dumps({"path": path, "hits": len(hits), "value": value, "bounds": bounds}))
"""


def _run(*args, env=None):
  environment = {k: v for k, v in os.environ.items()
                 if k not in ("JAX_COMPILATION_CACHE_DIR", compilation_cache.ENVIRONMENT_VARIABLE)}
  result = subprocess.run([sys.executable, "-c", PROGRAM, *args], capture_output=True,
                          text=True, env={**environment, **(env or {})}, check=True)
  assert "persistent compilation cache" not in result.stderr  # No entry failed to write or read.
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
  first = _run(str(tmp_path))
  second = _run(str(tmp_path))
  assert first["path"] == second["path"] == str(tmp_path / compilation_cache.host_kind())
  assert os.listdir(first["path"])  # The program was written ...
  assert first["hits"] == 0 and second["hits"] >= 1  # ... and loaded by the second process,
  assert first["value"] == second["value"]  # which computes the same.
  assert first["bounds"] == [compilation_cache.MAX_BYTES, compilation_cache.MIN_COMPILE_SECONDS]


def test_the_default_folder_comes_from_the_environment_and_none_turns_it_off(tmp_path):
  from_environment = _run(env={compilation_cache.ENVIRONMENT_VARIABLE: str(tmp_path / "env")})
  assert from_environment["path"] == str(tmp_path / "env" / compilation_cache.host_kind())
  off = _run("none")
  assert off["path"] is None and off["hits"] == 0
  # JAX's own setting is left in charge.
  jax_own = _run(str(tmp_path / "ours"), env={"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "j")})
  assert jax_own["path"] == str(tmp_path / "j") and not (tmp_path / "ours").exists()


def test_the_default_folder_follows_xdg(monkeypatch, tmp_path):
  monkeypatch.delenv(compilation_cache.ENVIRONMENT_VARIABLE, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compilation_cache.default_directory() == str(tmp_path / "jaxlm" / "xla")


def test_a_folder_that_cannot_be_made_is_one_clear_error_or_a_warning(tmp_path, monkeypatch,
                                                                       caplog):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(UserError, match=r"--compilation_cache=.*a_file.*cannot make.*'none'"):
    compilation_cache.enable(str(blocker))
  monkeypatch.setenv(compilation_cache.ENVIRONMENT_VARIABLE, str(blocker))  # The default: warn.
  assert compilation_cache.enable() is None
  assert "compiling without it" in caplog.text


@pytest.mark.parametrize("module", ["train", "eval", "generate"])
def test_every_entry_point_takes_the_flag(module):
  import importlib  # pylint: disable=import-outside-toplevel
  entry_point = importlib.import_module(f"jaxlm.{module}")
  required = {"train": ["--gin_file=x.gin"]}.get(module, ["--model_dir=/tmp/x"])
  assert entry_point.parse_args(required).compilation_cache is None
  assert entry_point.parse_args([*required, "--compilation_cache=none"]).compilation_cache == "none"


def test_a_bad_cache_folder_stops_training_before_anything_is_written(tmp_path, capsys,
                                                                     monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  from jaxlm import train  # pylint: disable=import-outside-toplevel
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  code = train.main(["--gin_file=experiments/quickstart.gin", f"--gin.MODEL_DIR='{tmp_path}/run'",
                     f"--compilation_cache={blocker}"])
  assert code == 2 and not (tmp_path / "run").exists()
  assert capsys.readouterr().err.strip().count("\n") == 0


def test_the_reload_check_says_no_where_nothing_comes_back(tmp_path):
  """The check behind enable(): where XLA reads nothing back (jax-ml/jax#38445 on some Intel
  CPUs; here, entries too small to be written), it says so and the cache stays off."""
  def check(**env):
    return subprocess.run([sys.executable, "-m", "jaxlm.training.compilation_cache",
                           str(tmp_path / "probe")], capture_output=True, text=True, check=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env}).stdout.strip()
  assert check(JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=str(2**40)) == "does not reload"
  assert check() == "reloads"


def test_a_host_that_does_not_reload_compiles_without_the_cache(tmp_path, monkeypatch, caplog):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  folder = tmp_path / compilation_cache.host_kind()
  folder.mkdir()
  record = folder / compilation_cache.RELOAD_CHECK
  record.write_text(json.dumps({"versions": compilation_cache._versions(), "reloads": False}))
  assert compilation_cache.enable(str(tmp_path)) is None
  assert "does not read back" in caplog.text
  # An answer for other versions is asked again (here: yes), and kept.
  record.write_text(json.dumps({"versions": "jax 0.0.1, jaxlib 0.0.1", "reloads": False}))
  assert compilation_cache.reloads_here(str(folder))
  assert json.loads(record.read_text()) == {"versions": compilation_cache._versions(),
                                            "reloads": True}
