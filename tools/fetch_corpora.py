"""Download the corpora the reproductions read, rebuild them byte for byte, check them, and put
them where `shared_corpus` looks.

    python tools/fetch_corpora.py                      # tinystories, wikitext2, french
    python tools/fetch_corpora.py --domains=french --out=/data/corpora

Each file is rebuilt from files of public GitHub repositories at pinned commits
(jaxlm/data/corpus_sources.py: the sources, the extraction, and the SHA-256 of every source and
every result); a source or a result with another checksum is refused and nothing of it is
written. The files go to --out, default $JAXLM_SHARED_CORPORA if set, else the cache
(~/.cache/jaxlm/corpora), which `shared_corpus` reads when neither $JAXLM_SHARED_CORPORA nor
../shared/corpora is there. A file already present with the right checksum is kept. The wikitext2
files need pyarrow (`pip install pyarrow`). Offline, it says so in one line and exits 2.
"""

import argparse
import importlib.util
import os
import sys
import urllib.error
import urllib.request

from jaxlm.data import corpus_sources as corpora
from jaxlm.data.sources import SHARED_CORPORA_ENV, corpora_cache_dir


class FetchError(Exception):
  pass


def download(url: str, mirror: str | None) -> bytes:
  """`url`'s bytes (from `mirror` + its path under raw.githubusercontent.com if given), checked
  against the recorded blob."""
  source = mirror.rstrip("/") + "/" + url[len(corpora.RAW):] if mirror else url
  try:
    with urllib.request.urlopen(source, timeout=60) as response:
      data = response.read()
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    raise FetchError(f"cannot download {source} ({reason}); are you offline? Copy a corpora "
                     f"folder by hand and set ${SHARED_CORPORA_ENV} to it instead") from None
  corpora.check_blob(url, data)
  return data


def fetch(names: list[str], out: str, mirror: str | None = None) -> list[str]:
  """Writes each file of `names` under `out` (atomically, after its checks); returns the names
  written (a file already there with the right checksum is left alone)."""
  written = []
  for name in names:
    path = os.path.join(out, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        if corpora.sha256(f.read()) == corpora.EXPECTED[name][0]:
          continue
    if name in corpora.NEEDS_PYARROW:
      if importlib.util.find_spec("pyarrow") is None:
        raise FetchError(f"{name} is rebuilt from parquet files, which needs pyarrow: "
                         "pip install pyarrow")
    urls, _ = corpora.RECIPES[name]
    data = corpora.build(name, [download(url, mirror) for url in urls])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
      f.write(data)
    os.replace(path + ".tmp", path)
    written.append(name)
  return written


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python tools/fetch_corpora.py",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--domains", default=",".join(corpora.DOMAINS),
                      help=f"comma-separated, of {', '.join(corpora.DOMAINS)}")
  parser.add_argument("--out", default=None,
                      help=f"where to write (default ${SHARED_CORPORA_ENV}, else the cache)")
  parser.add_argument("--mirror", default=None, help=argparse.SUPPRESS)  # Tests: a file:// copy.
  args = parser.parse_args(argv)
  domains = [d for d in args.domains.split(",") if d]
  unknown = sorted(set(domains) - set(corpora.DOMAINS))
  out = args.out or os.environ.get(SHARED_CORPORA_ENV) or corpora_cache_dir()
  try:
    if unknown or not domains:
      raise FetchError(f"--domains={args.domains!r}: choose among {', '.join(corpora.DOMAINS)}")
    names = [n for n in corpora.RECIPES if n.split("/")[0] in domains]
    written = fetch(names, out, args.mirror)
  except (FetchError, corpora.CorpusMismatch) as e:
    print(f"fetch_corpora: error: {e}", file=sys.stderr)
    return 2
  print(f"{len(names)} files in {out} ({len(written)} written, {len(names) - len(written)} "
        f"already there); the reproductions read them"
        + ("" if out == corpora_cache_dir() or out == os.environ.get(SHARED_CORPORA_ENV)
           else f" with {SHARED_CORPORA_ENV}={out}"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
