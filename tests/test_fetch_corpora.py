"""tools/fetch_corpora.py, offline: a file:// mirror stands in for raw.githubusercontent.com.
Files are rebuilt byte for byte and checked; a changed source, an unreachable host or an
unknown domain is one line, exit 2, and nothing is written."""

import os
import shutil

import pytest

from conftest import load_tool
from jaxlm.data import corpus_sources as corpora
from jaxlm.data.sources import shared_corpora_dir

fetch_corpora = load_tool("fetch_corpora")


@pytest.fixture
def tinystories_mirror(tmp_path):
  """The two TinyStories sources (kept verbatim by their recipe) as a file:// mirror, copied
  from the shared corpora."""
  shared = shared_corpora_dir()
  if not os.path.isfile(os.path.join(shared, "tinystories", "train.txt")):
    pytest.skip("needs the shared corpora (../shared/corpora or $JAXLM_SHARED_CORPORA)")
  mirror = tmp_path / "mirror"
  for name in ("tinystories/train.txt", "tinystories/valid.txt"):
    (url,), _ = corpora.RECIPES[name]
    blob = mirror / url[len(corpora.RAW):]
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(shared, name), blob)
  return mirror


def test_fetched_files_are_the_shared_corpora_byte_for_byte(tmp_path, tinystories_mirror, capsys):
  out = tmp_path / "corpora"
  args = ["--domains=tinystories", f"--out={out}", f"--mirror=file://{tinystories_mirror}"]
  assert fetch_corpora.main(args) == 0
  for name in ("tinystories/train.txt", "tinystories/valid.txt"):
    with open(os.path.join(shared_corpora_dir(), name), "rb") as f:
      assert (out / name).read_bytes() == f.read()
  assert "2 files in" in capsys.readouterr().out
  # A second run finds both with their checksums and downloads nothing (the mirror is gone).
  shutil.rmtree(tinystories_mirror)
  assert fetch_corpora.main(args) == 0
  assert "(0 written, 2 already there)" in capsys.readouterr().out


def test_a_changed_source_is_refused_and_nothing_is_written(tmp_path, tinystories_mirror, capsys):
  (url,), _ = corpora.RECIPES["tinystories/train.txt"]
  blob = tinystories_mirror / url[len(corpora.RAW):]
  blob.write_bytes(blob.read_bytes() + b"one more line\n")
  out = tmp_path / "corpora"
  assert fetch_corpora.main(["--domains=tinystories", f"--out={out}",
                             f"--mirror=file://{tinystories_mirror}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "is not the recorded blob" in err[0]
  assert not (out / "tinystories" / "train.txt").exists()


@pytest.mark.parametrize("args, expected", [
    (["--domains=tinystories", "--mirror=file:///nonexistent/mirror"], "cannot download"),
    (["--domains=klingon"], "--domains='klingon': choose among french, tinystories, wikitext2"),
])
def test_bad_input_or_no_network_is_one_line(tmp_path, capsys, args, expected):
  assert fetch_corpora.main([*args, f"--out={tmp_path / 'corpora'}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and expected in err[0], err
  assert not (tmp_path / "corpora").exists()


def test_every_source_and_file_has_a_recorded_checksum():
  for name, (urls, _) in corpora.RECIPES.items():
    assert name in corpora.EXPECTED and all(url in corpora.BLOBS for url in urls), name
