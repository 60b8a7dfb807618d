"""Tokenize text, JSON-lines and Parquet files into a jaxlm tokenized store.

    python tools/prepare_data.py --input='/data/web/*.jsonl' --output=/data/stores/web \
        --tokenizer=sentencepiece:/data/sp8k.model [--field=text] [--num_workers=8]

The output is a local path or a tensorstore URL (gs://bucket/path). Running it again on the same
inputs does nothing; see jaxlm/data/prepare.py for the guarantees and every flag.
"""

import sys

from jaxlm.data.prepare import main

if __name__ == "__main__":
  sys.exit(main())
