"""tools/accelerator_check.py: the one-command GPU/TPU check runs end to end on CPU with
--dry_run (tiny shapes, the Pallas kernel in interpret mode), so that it cannot rot."""

import json

from conftest import load_tool

accelerator_check = load_tool("accelerator_check")


def test_the_dry_run_checks_times_and_writes_its_json_and_table(tmp_path, capsys):
  assert accelerator_check.main(["--dry_run", f"--out={tmp_path}"]) == 0
  report = json.loads((tmp_path / "accelerator_check.json").read_text())
  # Every Pallas case agreed with the reference at least as well as XLA's own attention.
  assert report["correctness"] and all(r["ok"] for r in report["correctness"])
  assert {r["dtype"] for r in report["correctness"]} == {"float32", "bfloat16"}
  assert {r["gqa"] for r in report["correctness"]} == {1, 4}
  timed = [r for r in report["attention"] if "fwd_bwd_ms" in r]
  assert {r["impl"] for r in timed} == {"pallas", "xla"} and all(r["fwd_ms"] > 0 for r in timed)
  step = report["step"]
  assert step["step_ms"] > 0 and 0 < step["mfu"] and step["attention"] in {"pallas", "xla"}
  table = (tmp_path / "accelerator_check.md").read_text()
  assert "| fwd + bwd, causal, packed | 64 | 4 | bfloat16 |" in table and "MFU" in table
  assert table in capsys.readouterr().out


def test_without_an_accelerator_it_says_so_in_one_line(tmp_path, capsys):
  assert accelerator_check.main([f"--out={tmp_path}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no GPU or TPU here; use --dry_run" in err[0]
