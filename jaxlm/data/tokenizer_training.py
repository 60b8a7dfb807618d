"""Training a SentencePiece model offline from local text, JSON-lines or Parquet files.

    python tools/train_tokenizer.py --input='/data/corpus/*.txt' --output=/data/sp8k.model \
        --vocab_size=8192

The model is lossless on any text, so that bits per byte is exact and code keeps its layout:
identity normalisation (no NFKC, no collapsing of spaces), no dummy-prefix space, digits split,
and byte fallback for anything outside the learned pieces (newlines included). Ids 0-3 are
pad, bos, eos and unk, matching the byte tokenizer's pad/bos/eos.
"""

import argparse
import io
import logging
import os
import pathlib
import sys
import tempfile
from collections.abc import Iterator, Sequence

from jaxlm.data import readers
from jaxlm.errors import UserError

logger = logging.getLogger("jaxlm")


def _sentences(files, options, stats) -> Iterator[str]:
  # SentencePiece learns from lines; a line never holds a newline, which byte fallback covers.
  for path in files:
    for document in readers.read_documents(path, stats=stats, **options):
      for line in document.split("\n"):
        if line:
          yield line


def train_sentencepiece(inputs: str | Sequence[str], output: str, vocab_size: int = 8192, *,
                        model_type: str = "bpe", character_coverage: float = 0.9995,
                        max_sentences: int = 2_000_000, file_format: str = "auto",
                        field: str = "text", on_bad_utf8: str = "replace",
                        num_threads: int | None = None, seed_sentencepiece_size: int = 1_000_000,
                        ) -> pathlib.Path:
  """Trains a model on the documents of `inputs` and writes it to `output` (a .model file),
  atomically: an interrupted run leaves no model behind."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  if model_type not in ("bpe", "unigram"):
    raise UserError(f"model_type must be bpe or unigram, got {model_type!r}")
  if vocab_size < 8:
    raise UserError(f"vocab_size must be at least 8, got {vocab_size}")
  files = readers.expand_paths(inputs, binding="--input")
  options = {"file_format": file_format, "field": field, "on_bad_utf8": on_bad_utf8}
  stats = readers.ReadStats()
  model = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_sentences(files, options, stats), model_writer=model,
        vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, seed_sentencepiece_size=seed_sentencepiece_size,
        max_sentence_length=1 << 14, num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=1)
  except RuntimeError as e:
    raise UserError(f"SentencePiece training failed: {e}") from None
  stats.log(f"train_tokenizer {output}")
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=output.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(model.getvalue())
    os.chmod(tmp, 0o644)
    os.replace(tmp, output)
  except BaseException:
    os.unlink(tmp)
    raise
  logger.info("wrote a %d-piece %s SentencePiece model to %s", vocab_size, model_type, output)
  return output


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Train a SentencePiece tokenizer offline.")
  parser.add_argument("--input", action="append", required=True,
                      help="a file, directory or glob; repeat for more")
  parser.add_argument("--output", required=True, help="the .model file to write")
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--model_type", default="bpe", choices=("bpe", "unigram"))
  parser.add_argument("--character_coverage", type=float, default=0.9995)
  parser.add_argument("--max_sentences", type=int, default=2_000_000,
                      help="lines sampled for training")
  parser.add_argument("--format", default="auto", choices=readers.FORMATS)
  parser.add_argument("--field", default="text", help="JSON-lines field / Parquet column")
  parser.add_argument("--on_bad_utf8", default="replace", choices=readers.BAD_UTF8_POLICIES)
  parser.add_argument("--num_threads", type=int, default=None)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      stream=sys.stderr)
  try:
    path = train_sentencepiece(args.input, args.output, args.vocab_size,
                               model_type=args.model_type,
                               character_coverage=args.character_coverage,
                               max_sentences=args.max_sentences, file_format=args.format,
                               field=args.field, on_bad_utf8=args.on_bad_utf8,
                               num_threads=args.num_threads)
  except UserError as e:
    print(f"train_tokenizer: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  return 0
