"""Quality subsets (stability gap): tools/score_documents.py scores each document with a run's
loss; scored_documents keeps the lowest-loss fraction in file order and refuses a changed file."""

import json

import numpy as np
import pytest

from conftest import load_tool
from jaxlm.methods.continual.document_scores import best_documents, scored_documents
from jaxlm.data.sources import documents_source
from jaxlm.data.pipeline import DataConfig, build_datasets
from jaxlm.errors import UserError

PROSE = "The quick brown fox jumps over the lazy dog and then it naps in the warm sun."
NOISE = "qZ#v8$kW!x;9@Lp%Jr^2&Ty*(M)Ux_4+Bn=7"


@pytest.fixture(scope="module")
def scored(quick_trained_run, tmp_path_factory):
  root = tmp_path_factory.mktemp("scores")
  documents = [PROSE, NOISE, PROSE.upper(), NOISE[::-1], PROSE]
  text = root / "new.txt"
  text.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
  out = root / "scores.jsonl"
  tool = load_tool("score_documents")
  assert tool.main([str(quick_trained_run[0]), f"--text_file={text}", f"--out={out}",
                    "--batch_size=2", "--max_len=64"]) == 0
  return text, out, documents


def test_every_document_is_scored_by_the_run(scored):
  _, out, documents = scored
  lines = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
  header, rows = lines[0]["header"], lines[1:]
  assert header["step"] == 6 and header["separator"] == "\n\n" and len(rows) == len(documents)
  losses = np.array([r["loss"] for r in rows])
  # The same document in another batch and position scores the same; English text scores below
  # punctuation noise even for a model trained 6 steps.
  np.testing.assert_allclose(losses[0], losses[4], rtol=1e-5)
  assert max(losses[0], losses[2]) < min(losses[1], losses[3])
  # bos + bytes, less the first: one target per byte, the first max_len of them.
  assert [r["tokens"] for r in rows] == [min(len(d.encode()), 64) for d in documents]


def test_the_best_fraction_is_kept_in_file_order(scored):
  text, out, documents = scored
  source = scored_documents(scores=str(out), keep_fraction=0.6, name="new")
  datasets = build_datasets(DataConfig(source=lambda: source, seq_len=32, batch_size=2,
                                       valid_fraction=0.5))
  assert datasets.train.num_rows > 0
  assert best_documents(["a", "b", "c", "d"], [3.0, 1.0, 2.0, 0.5], 0.5) == ["b", "d"]
  # Given the source that was scored, the subset takes its name and its validation documents.
  scored_source = documents_source(documents, name="french", valid_documents=["held out"])
  subset = scored_documents(scores=str(out), keep_fraction=0.6, source=scored_source)
  assert subset.name == "french" and list(subset.read_valid()) == ["held out"]
  assert list(subset.read()) == list(source.read())
  text.write_text(text.read_text(encoding="utf-8") + "more\n", encoding="utf-8")
  with pytest.raises(UserError, match="changed since; score it again"):
    scored_documents(scores=str(out), keep_fraction=0.5)


def test_bad_input_is_one_line(quick_trained_run, tmp_path, capsys):
  tool = load_tool("score_documents")
  assert tool.main([str(quick_trained_run[0]), f"--text_file={tmp_path / 'none.txt'}",
                    f"--out={tmp_path / 's.jsonl'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert "none.txt does not exist" in err and len(err.splitlines()) == 1
  with pytest.raises(UserError, match="does not exist; write it with tools/score_documents.py"):
    scored_documents(scores=str(tmp_path / "missing.jsonl"))
  with pytest.raises(UserError, match=r"keep_fraction must be in \(0, 1\]"):
    scored_documents(scores=str(tmp_path / "missing.jsonl"), keep_fraction=5)
