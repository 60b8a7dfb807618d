"""Train a SentencePiece tokenizer offline from local text, JSON-lines or Parquet files.

    python tools/train_tokenizer.py --input='/data/corpus/*.txt' --output=/data/sp8k.model \
        --vocab_size=8192

Then: DataConfig.tokenizer = @sentencepiece_tokenizer()
      sentencepiece_tokenizer.model_path = '/data/sp8k.model'
See jaxlm/data/tokenizer_training.py for the model's settings (lossless, byte fallback).
"""

import sys

from jaxlm.data.tokenizer_training import main

if __name__ == "__main__":
  sys.exit(main())
