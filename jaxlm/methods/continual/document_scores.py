"""Quality subsets against the stability gap (Guo et al., arXiv:2406.14833): score every document
of the new domain with a small reference model's loss, keep the best (lowest-loss) fraction,
and train several epochs over it instead of one pass over k times more data.

    python tools/score_documents.py /runs/small_ref --domain=french --out=french_scores.jsonl
    continual/DataConfig.sources = [@wiki/shared_corpus(), @french/scored_documents()]
    french/scored_documents.scores = "french_scores.jsonl"
    french/scored_documents.keep_fraction = 0.05

A scores file is JSON lines: a header naming the scored text file (path, sha256, separator, the
valid file if any, the reference run and step), then one {"document", "loss", "tokens"} per
document in file order. The source re-reads that file and refuses it if it changed.
"""

import json
import os
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import readers
from jaxlm.data.batches import make_examples
from jaxlm.data.sources import TextSource
from jaxlm.errors import UserError
from jaxlm.model.loss import token_losses


def document_losses(params, config, tokenizer, documents, max_len: int = 256,
                    batch_size: int = 16):
  """(mean nats per predicted token, tokens scored) of each document's first max_len + 1 tokens
  (bos first), under the model."""
  step = jax.jit(lambda p, b: _summed(p, config, b))
  losses, counts = [], []
  for start in range(0, len(documents), batch_size):
    chunk = documents[start:start + batch_size]
    tokens = np.zeros((batch_size, max_len + 1), np.int32)
    segments = np.zeros_like(tokens)
    for row, text in enumerate(chunk):
      ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(text)])[:max_len + 1]
      tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
    positions = np.tile(np.arange(max_len + 1, dtype=np.int32), (batch_size, 1))
    nats, targets = jax.device_get(step(params, make_examples(tokens, segments, positions)))
    losses += list(nats[:len(chunk)] / np.maximum(targets[:len(chunk)], 1))
    counts += [int(t) for t in targets[:len(chunk)]]
  return np.asarray(losses), np.asarray(counts)


def _summed(params, config, batch):
  ce_BL = token_losses(params, config, {k: jnp.asarray(v) for k, v in batch.items()})
  return jnp.sum(ce_BL * batch["weights"], axis=1), jnp.sum(batch["weights"], axis=1)


def write_scores(out: str, header: dict, losses, counts) -> None:
  with open(out + ".tmp", "w", encoding="utf-8") as f:
    f.write(json.dumps({"header": header}) + "\n")
    for i, (loss, count) in enumerate(zip(losses, counts)):
      f.write(json.dumps({"document": i, "loss": float(loss), "tokens": int(count)}) + "\n")
  os.replace(out + ".tmp", out)


def read_scores(path: str) -> tuple[dict, np.ndarray]:
  """(header, loss of each document)."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = [json.loads(line) for line in f if line.strip()]
  except FileNotFoundError:
    raise UserError(f"scored_documents.scores: {path} does not exist; write it with "
                    "tools/score_documents.py") from None
  except ValueError as e:
    raise UserError(f"{path} is not a scores file ({e})") from None
  if not lines or "header" not in lines[0]:
    raise UserError(f"{path} has no header line; write it with tools/score_documents.py")
  return lines[0]["header"], np.asarray([r["loss"] for r in lines[1:]], np.float64)


def best_documents(documents: list[str], losses, keep_fraction: float) -> list[str]:
  """The keep_fraction of documents with the lowest loss, in their file order."""
  keep = max(1, int(round(keep_fraction * len(documents))))
  chosen = np.sort(np.argsort(losses, kind="stable")[:keep])
  return [documents[i] for i in chosen]


@gin.configurable
def scored_documents(scores: str = gin.REQUIRED, keep_fraction: float = 0.1,
                     name: str | None = None, source: TextSource | None = None) -> TextSource:
  """The best-scored keep_fraction of the documents a scores file scored (lowest reference
  loss first kept), validated on the scored source's valid file when it had one. `source`: the
  source that was scored (e.g. @french/shared_corpus()), when the config builds it anyway: the
  subset takes its name and is validated on its validation documents."""
  if not 0 < keep_fraction <= 1:
    raise UserError(f"scored_documents.keep_fraction must be in (0, 1], got {keep_fraction!r}")
  header, losses = read_scores(scores)
  path = header["path"]
  if not os.path.isfile(path) or readers.file_sha256(path) != header["sha256"]:
    raise UserError(f"{path}, which {scores} scored, is missing or changed since; score it again "
                    "with tools/score_documents.py")
  options = dict(file_format="text", separator=header["separator"], on_bad_utf8="replace")

  def train():
    documents = readers.read_all([pathlib.Path(path)], f"scored source {name!r}", **options)
    if len(documents) != len(losses):
      raise UserError(f"{scores} scores {len(losses)} documents but {path} has "
                      f"{len(documents)}; score it again")
    return best_documents(documents, losses, keep_fraction)
  if source is not None:
    return TextSource(name or source.name, train, source.read_valid)
  valid = header.get("valid_path")
  source_name = name or header.get("name", "scored")
  if valid is None:
    return TextSource(source_name, train)
  # The valid file split as the scored source splits it, so evaluations compare with its runs.
  valid_options = {**options, "separator": header.get("valid_separator", header["separator"])}
  return TextSource(source_name, train, lambda: readers.read_all(
      [pathlib.Path(valid)], f"source {source_name!r} (valid)", **valid_options))

