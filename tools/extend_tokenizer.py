"""Extend a tokenizer.json or a SentencePiece .model with pieces learned on new-domain text,
keeping every existing id (jaxlm.methods.continual.vocab_expansion), for the expand_vocabulary
transition.

    python tools/extend_tokenizer.py --base=/models/x/tokenizer.json --text_file=new.txt \\
        --new_tokens=2000 --out=extended.json
    python tools/extend_tokenizer.py --base=bytes --domain=french --new_tokens=256 --out=fr.json
    python tools/extend_tokenizer.py --base=sp8k.model --text_file=new.txt --new_tokens=1000 \
        --out=sp8k_new.model

--base=bytes starts from a tokenizer.json that encodes exactly as jaxlm's byte tokenizer, so a
byte-level run can grow a vocabulary. Learns from at most --max_bytes of the text. Bad input is
one line on stderr, exit 2.
"""

import argparse
import os
import sys

from jaxlm.config.cli import run_guarded, setup_logging
from jaxlm.errors import UserError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--base", required=True, help="a tokenizer.json, or 'bytes'")
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--text_file", help="new-domain UTF-8 text")
  where.add_argument("--domain", help="a shared corpus domain (../shared/corpora)")
  parser.add_argument("--new_tokens", type=int, required=True)
  parser.add_argument("--max_bytes", type=int, default=4 << 20)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  setup_logging()

  def body() -> int:
    # pylint: disable=import-outside-toplevel
    from jaxlm.methods.continual.vocab_expansion import (byte_tokenizer_json, extend_sentencepiece,
                                                 extend_tokenizer_json)
    from jaxlm.data.sources import shared_corpora_dir
    from jaxlm.data.tokenizers import HuggingFaceTokenizer, SentencePieceTokenizer
    if args.new_tokens < 1:
      raise UserError(f"--new_tokens must be at least 1, got {args.new_tokens}")
    text_file = args.text_file or os.path.join(shared_corpora_dir(), args.domain, "train.txt")
    if not os.path.isfile(text_file):
      raise UserError(f"{text_file} does not exist; give new-domain text with --text_file")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.base.endswith(".model"):  # SentencePiece.
      try:
        with open(args.base, "rb") as f:
          proto = f.read()
      except OSError as e:
        raise UserError(f"cannot read --base {args.base!r} ({e.strerror})") from None
      with open(args.out, "wb") as f:
        f.write(extend_sentencepiece(proto, text_file, args.new_tokens))
      print(f"{args.out}: {SentencePieceTokenizer(args.out).vocab_size} ids")
      return 0
    if args.base == "bytes":
      base = byte_tokenizer_json()
    else:
      try:
        with open(args.base, encoding="utf-8") as f:
          base = f.read()
      except OSError as e:
        raise UserError(f"cannot read --base {args.base!r} ({e.strerror})") from None
    with open(text_file, encoding="utf-8", errors="replace") as f:
      text = f.read(args.max_bytes)
    extended = extend_tokenizer_json(base, text.splitlines(), args.new_tokens)
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(extended)
    print(f"{args.out}: {HuggingFaceTokenizer(args.out).vocab_size} ids")
    return 0

  return run_guarded(body)


if __name__ == "__main__":
  sys.exit(main())
