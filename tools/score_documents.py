"""Score every document of a text source with a trained run's loss, for quality subsets against
the stability gap (jaxlm.methods.continual.document_scores; Guo et al., arXiv:2406.14833).

    python tools/score_documents.py /runs/small_ref --domain=french --separator='\\n' \\
        --out=/runs/french_scores.jsonl [--step=N] [--max_len=256] [--batch_size=16]
    python tools/score_documents.py /runs/small_ref --text_file=/data/new.txt --out=scores.jsonl

--domain names a shared corpus (its train.txt, validated on its valid.txt); --text_file any UTF-8
file. Documents are the file split on --separator (default: a blank line). Each is scored by
the run's mean loss over its first max_len tokens; `scored_documents` keeps the lowest. Bad
input is one line on stderr, exit 2.
"""

import argparse
import codecs
import os
import pathlib
import sys

from jaxlm.config.cli import run_guarded, setup_logging
from jaxlm.errors import UserError


def score(run_dir: str, text_file: str, out: str, separator: str, valid_file: str | None = None,
          name: str | None = None, step: int | None = None, max_len: int = 256,
          batch_size: int = 16, valid_separator: str | None = None) -> int:
  """Writes the scores file; returns the number of documents scored."""
  # pylint: disable=import-outside-toplevel
  from jaxlm.methods.continual.document_scores import document_losses, write_scores
  from jaxlm.data import readers
  from jaxlm.training.saved_run import load_saved_run
  if not os.path.isfile(text_file):
    raise UserError(f"{text_file} does not exist; give a UTF-8 text file or a --domain")
  documents = readers.read_all([pathlib.Path(text_file)], "documents to score",
                               file_format="text", separator=separator, on_bad_utf8="replace")
  if not documents:
    raise UserError(f"{text_file} holds no documents split on {separator!r}")
  run = load_saved_run(run_dir, step)
  with run.scope():
    losses, counts = document_losses(run.params, run.stage.model, run.tokenizer, documents,
                                     max_len, batch_size)
  write_scores(out, {
      "path": os.path.abspath(text_file), "sha256": readers.file_sha256(pathlib.Path(text_file)),
      "separator": separator, "valid_path": valid_file and os.path.abspath(valid_file),
      "valid_separator": valid_separator,
      "name": name, "run": os.path.abspath(run_dir), "step": run.step, "max_len": max_len},
      losses, counts)
  return len(documents)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("run_dir", help="the reference run's MODEL_DIR")
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--domain", help="a shared corpus domain (../shared/corpora)")
  where.add_argument("--text_file", help="a UTF-8 text file")
  parser.add_argument("--separator", default="\\n\\n",
                      help="what separates documents (Python escapes; default: a blank line)")
  parser.add_argument("--out", required=True, help="the scores file to write (JSON lines)")
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--max_len", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args(argv)
  setup_logging()

  def body() -> int:
    from jaxlm.data.sources import shared_corpora_dir  # pylint: disable=import-outside-toplevel
    separator = codecs.decode(args.separator, "unicode_escape")
    text_file, valid, name = args.text_file, None, None
    if args.domain:
      folder = os.path.join(shared_corpora_dir(), args.domain)
      text_file, valid, name = (os.path.join(folder, "train.txt"),
                                os.path.join(folder, "valid.txt"), args.domain)
    # A shared corpus's valid.txt is one document, as shared_corpus reads it.
    count = score(args.run_dir, text_file, args.out, separator, valid, name, args.step,
                  args.max_len, args.batch_size, valid_separator=None)
    print(f"scored {count} documents of {text_file} -> {args.out}")
    return 0

  return run_guarded(body)


if __name__ == "__main__":
  sys.exit(main())
