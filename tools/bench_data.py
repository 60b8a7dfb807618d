"""Data pipeline throughput: prepare_data and train batches, byte vs SentencePiece tokenizers.

    python tools/bench_data.py [--steps=400] [--seq_len=256] [--batch_size=16]

For each tokenizer: prepares two stores (a large and a small domain: French novels and
Shakespeare from ../shared/corpora when present, else the built-in corpus's code and prose),
then times `batch_at` over a 95% / 5% mixture of them, the way the trainer calls it (one batch at
a time, on this thread). The SentencePiece model (4096 pieces) is trained on the large domain
first. Compare the tokens/s with what the trainer consumes (~13,000 tokens/s for the quickstart
model on a 2-core CPU).
"""

import argparse
import logging
import pathlib
import tempfile
import time

from jaxlm.data import corpora
from jaxlm.data.pipeline import DataConfig, build_datasets
from jaxlm.data.prepare import prepare_data
from jaxlm.data.sources import tokenized_store
from jaxlm.data.tokenizer_training import train_sentencepiece
from jaxlm.data.tokenizers import ByteTokenizer, SentencePieceTokenizer

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "corpora"


def _domains(workdir: pathlib.Path) -> dict[str, tuple[str, str | None]]:
  """name -> (input file, separator)."""
  if (SHARED / "french" / "train.txt").exists():
    return {"french": (str(SHARED / "french" / "train.txt"), "\n"),
            "shakespeare": (str(SHARED / "shakespeare" / "train.txt"), "\n\n")}
  domains = {}
  for domain in ("code", "prose"):
    path = workdir / f"{domain}.txt"
    path.write_text("\x1e".join(corpora.builtin_documents(domain)), encoding="utf-8")
    domains[domain] = (str(path), "\x1e")
  return domains


def _time_batches(datasets, steps: int) -> float:
  datasets.train.batch_at(0)  # Warm the chunk cache and the sampling plan once.
  start = time.perf_counter()
  for step in range(1, steps + 1):
    datasets.train.batch_at(step)
  return steps * datasets.train.tokens_per_batch / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp)
    domains = _domains(workdir)
    big, small = list(domains)
    sp_model = train_sentencepiece(domains[big][0], workdir / "sp.model", 4096)
    print(f"{'tokenizer':<14} {'prepare tokens/s':>17} {'prepare MB/s':>13} "
          f"{'batches tokens/s':>17} {'batch ms':>9}")
    for label, tokenizer in (("byte", ByteTokenizer()),
                             ("sentencepiece", SentencePieceTokenizer(sp_model))):
      tokens, megabytes, seconds = 0, 0.0, 0.0
      for name, (path, separator) in domains.items():
        start = time.perf_counter()
        manifest = prepare_data(path, str(workdir / label / name), tokenizer,
                                separator=separator, name=name)
        seconds += time.perf_counter() - start
        tokens += manifest["num_tokens"]
        megabytes += pathlib.Path(path).stat().st_size / 1e6
      config = DataConfig(
          sources=[tokenized_store(str(workdir / label / name)) for name in domains],
          mixture={big: 0.95, small: 0.05}, tokenizer=tokenizer, seq_len=args.seq_len,
          batch_size=args.batch_size, max_eval_batches=1)
      datasets = build_datasets(config)
      rate = _time_batches(datasets, args.steps)
      batch_ms = 1e3 * datasets.train.tokens_per_batch / rate
      print(f"{label:<14} {tokens / seconds:>17,.0f} {megabytes / seconds:>13.1f} "
            f"{rate:>17,.0f} {batch_ms:>9.2f}")


if __name__ == "__main__":
  main()
