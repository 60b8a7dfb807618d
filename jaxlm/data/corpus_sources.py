"""Where the reproductions' corpora come from, and how each file is rebuilt from its public
source byte for byte: tinystories/, wikitext2/ and french/ (train.txt and valid.txt each), the
domains the reproductions read through `shared_corpus` (provenance: the corpora folder's
README). Every source is a file of a public GitHub repository at a pinned commit; every blob
and every rebuilt file has its SHA-256 here, so a download that differs is refused, never used.
`python tools/fetch_corpora.py` downloads, rebuilds, checks and writes them.

The wikitext2 recipes read Hugging Face parquet / arrow files and need pyarrow.
"""

import hashlib

RAW = "https://raw.githubusercontent.com/"

_TS_TRAIN = RAW + "s-ajaykumar/smallGPT/b8b899265a5574abd2c19d8857039309184a357c/data/tiny_stories.txt"
_TS_VALID = RAW + "yuninxia/moe-routing-bench/bb9bb0bd461aa77cf6ab89423b758f586a6f75d1/data/tinystories_val.txt"

_MINICPM = RAW + "OpenBMB/MiniCPM/0fcc3d08330ee612d59d58e312a778ae78165d97/quantize/quantize_data/wikitext/"
# hf://datasets/wikitext@b08601e0.../wikitext-2-raw-v1/validation-00000-of-00001.parquet
_WT_VALID_PARQUET = _MINICPM + "downloads/300e51c2d3e98b6cf3739090e25ea220d1a568457b1b2d97857e1cf71da48434"
# hf://datasets/wikitext@b08601e0.../wikitext-2-raw-v1/test-00000-of-00001.parquet
_WT_TEST_PARQUET = _MINICPM + "downloads/5e548f01091b2f01906ea7be35b8a1a6aa74842629dc550b7a02ca0821f1002d"
# datasets cache file holding only the first 500 rows of the train split
_WT_TRAIN500_ARROW = (_MINICPM + "wikitext/wikitext-2-raw-v1/0.0.0/"
                      "b08601e04326c79dfdd32d625aee71d232d685c3/wikitext-train.arrow")

_TEXTBOX = RAW + "cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/"
_FR_TRAIN = [_TEXTBOX + n for n in (
    "Verne_DeuxAnsVacances-rd0149.txt",
    "Verne_IleMysterieuse-rd0169.txt",
    "Zola_AbbeMouret-rd0104.txt",
    "Flaubert_EducationSentimentale-rd0041.txt",
    "Maupassant_UneVie-rd0056.txt",
    "Daudet_PetitChose-rd0020.txt",
    "Malot_SansFamille-rd0410.txt",
    "Gaboriau_CrimeOrcival-rd1155.txt",
    "Sand_Valvedre-rd1282.txt",
    "About_OreilleCassee-rd0730.txt",
    "Aimard_BelleRiviere-rd0311.txt",
    "Aurevilly_PretreMarie-rd0737.txt",
)]
_FR_VALID = [_TEXTBOX + "Zola_JoieVivre-rd0098.txt"]

# (sha256, size in bytes) of each source blob as downloaded
BLOBS = {
    "https://raw.githubusercontent.com/s-ajaykumar/smallGPT/b8b899265a5574abd2c19d8857039309184a357c/data/tiny_stories.txt":
        ("c56cfd24fb1c542b141a396184b822a4db3672abdb4c49c6aa843171c5e822a5", 944426),
    "https://raw.githubusercontent.com/yuninxia/moe-routing-bench/bb9bb0bd461aa77cf6ab89423b758f586a6f75d1/data/tinystories_val.txt":
        ("5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6", 794375),
    "https://raw.githubusercontent.com/OpenBMB/MiniCPM/0fcc3d08330ee612d59d58e312a778ae78165d97/quantize/quantize_data/wikitext/wikitext/wikitext-2-raw-v1/0.0.0/b08601e04326c79dfdd32d625aee71d232d685c3/wikitext-train.arrow":
        ("11914421bbff7497e0309d630826fe66e4c22dad364e564a46230ba036e1848f", 121528),
    "https://raw.githubusercontent.com/OpenBMB/MiniCPM/0fcc3d08330ee612d59d58e312a778ae78165d97/quantize/quantize_data/wikitext/downloads/5e548f01091b2f01906ea7be35b8a1a6aa74842629dc550b7a02ca0821f1002d":
        ("5f1bea067869d04849c0f975a2b29c4ff47d867f484f5010ea5e861eab246d91", 732610),
    "https://raw.githubusercontent.com/OpenBMB/MiniCPM/0fcc3d08330ee612d59d58e312a778ae78165d97/quantize/quantize_data/wikitext/downloads/300e51c2d3e98b6cf3739090e25ea220d1a568457b1b2d97857e1cf71da48434":
        ("204929b7ff9d6184953f867dedb860e40aa69c078fc1e54b3baaa8fb28511c4c", 657209),
    "https://raw.githubusercontent.com/cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/Verne_DeuxAnsVacances-rd0149.txt":
        ("b9a01be029c8346f5b6c41f61b74e0dca2a485243cb9cebf742df9d4ba43aee7", 751164),
    "https://raw.githubusercontent.com/cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/Verne_IleMysterieuse-rd0169.txt":
        ("cb3e80e2e2e7c6f283606241aef71b538e467ded4163838351bb6d67b78da6b2", 1248792),
    "https://raw.githubusercontent.com/cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/Zola_AbbeMouret-rd0104.txt":
        ("7f73da31ca854152e5b35463a4f92050b9535137f24f54c2a65d2bc6960e85d2", 712795),
    "https://raw.githubusercontent.com/cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/Flaubert_EducationSentimentale-rd0041.txt":
        ("7b295e31895671f7b065fc9c70a7e041c341e28a3fb687d1268d3562a7d23bda", 923336),
    "https://raw.githubusercontent.com/cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/Maupassant_UneVie-rd0056.txt":
        ("b5581bb825991b1ccec7d7b4b239fb94e9e3044ef1fc47098626680be65795a5", 462369),
    "https://raw.githubusercontent.com/cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/Daudet_PetitChose-rd0020.txt":
        ("f2514a040a494429980edcfbd0180371781501658ae50bd560ff416e27bfa726", 494583),
    "https://raw.githubusercontent.com/cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/Malot_SansFamille-rd0410.txt":
        ("1c650cff9fb6dbca2a28d382973193451ab347f8566122ff46dcc5980316f498", 697198),
    "https://raw.githubusercontent.com/cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/Gaboriau_CrimeOrcival-rd1155.txt":
        ("929b7c13274b14979a749d8e1c56281151c6c10f006fa3795444a5218d46a9b6", 724597),
    "https://raw.githubusercontent.com/cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/Sand_Valvedre-rd1282.txt":
        ("07e0b1d159a96cf3b2fb03c06b193cb037154854ec5acb7a5e0efebde1e1df7c", 524733),
    "https://raw.githubusercontent.com/cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/About_OreilleCassee-rd0730.txt":
        ("2d6a4830ac6569a087c84b6263745bf7b4a68efe869f2cae31baee581d05d63b", 339606),
    "https://raw.githubusercontent.com/cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/Aimard_BelleRiviere-rd0311.txt":
        ("012dbd158d398e25fbb93f187ef40c5529af306e0b5c2a28e63a80699118f596", 828566),
    "https://raw.githubusercontent.com/cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/Aurevilly_PretreMarie-rd0737.txt":
        ("dff865b5bd18f0f35734a501ad53d47dce431f09fd05c6e2bdc3479a6834a73a", 795010),
    "https://raw.githubusercontent.com/cligs/textbox/1b91e940475c8a7e866457a3953fed5edb0a29f1/french/roman19/txt/Zola_JoieVivre-rd0098.txt":
        ("c212e909b0fa1b7b3b4b1d3f402b32df0251e0537a662767f770ae4825acf0ef", 738180),
}

# Each rebuilt file: (sha256, bytes, number of "\n").
EXPECTED = {
    "tinystories/train.txt": ("c56cfd24fb1c542b141a396184b822a4db3672abdb4c49c6aa843171c5e822a5", 944426, 10426),
    "tinystories/valid.txt": ("5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6", 794375, 8659),
    "wikitext2/train.txt": ("023dff141da8f65bb9cf117a4ad7c182bc1e2cb50361ce3a65d5b5ec57c336dc", 1409955, 4858),
    "wikitext2/valid.txt": ("4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7", 1146846, 3760),
    "french/train.txt": ("e0e9aa8fca34e2fe9c310fd6bc709553b51c366918571e25f8bd13104897a977", 8464352, 40092),
    "french/valid.txt": ("bbe2cebc0fe8f4d47c3ffd46321ee26b508df54b40c5c86fc47c08530871d837", 735822, 2366),
}


# ---------------------------------------------------------------- tinystories
def _verbatim(blobs: list[bytes]) -> bytes:
  """The file is the source blob byte for byte."""
  (b,) = blobs
  return b


# ------------------------------------------------------------------ wikitext2
def _wt_rows(table) -> str:
  # Column 'text'; every non-empty row already ends with '\n'. An empty row "" becomes " \n".
  # Rows are concatenated in order with no separator.
  return "".join(" \n" if s == "" else s for s in table.column("text").to_pylist())


def _read_parquet(b: bytes):
  import pyarrow as pa
  import pyarrow.parquet as pq
  return pq.read_table(pa.BufferReader(b))


def _read_arrow_stream(b: bytes):
  import pyarrow as pa
  return pa.ipc.open_stream(pa.BufferReader(b)).read_all()  # HF datasets cache = Arrow IPC stream


def _wikitext_valid(blobs: list[bytes]) -> bytes:
  (valid_parquet,) = blobs  # 3,760 rows
  return _wt_rows(_read_parquet(valid_parquet)).encode("utf-8")


def _wikitext_train(blobs: list[bytes]) -> bytes:
  train500_arrow, test_parquet = blobs  # 500 rows, then 4,358 rows
  return (_wt_rows(_read_arrow_stream(train500_arrow)) + _wt_rows(_read_parquet(test_parquet))).encode("utf-8")


# --------------------------------------------------------------------- french
def _novel(b: bytes) -> str:
  """One novel: decode UTF-8, split on '\n' only, str.rstrip() every line (Python's Unicode
  whitespace, so a trailing U+00A0 NBSP is removed too: this matters for train), then drop the
  blank lines at the start and end of the novel. Interior blank lines are kept."""
  lines = [ln.rstrip() for ln in b.decode("utf-8").split("\n")]
  while lines and not lines[0]:
    lines.pop(0)
  while lines and not lines[-1]:
    lines.pop()
  return "\n".join(lines)


def _french(blobs: list[bytes]) -> bytes:
  """Novels in the given order, separated by one blank line ('\n\n'), plus a final '\n'."""
  return ("\n\n".join(_novel(b) for b in blobs) + "\n").encode("utf-8")


RECIPES = {
  "tinystories/train.txt": ([_TS_TRAIN], _verbatim),
  "tinystories/valid.txt": ([_TS_VALID], _verbatim),
  "wikitext2/train.txt": ([_WT_TRAIN500_ARROW, _WT_TEST_PARQUET], _wikitext_train),
  "wikitext2/valid.txt": ([_WT_VALID_PARQUET], _wikitext_valid),
  "french/train.txt": (_FR_TRAIN, _french),
  "french/valid.txt": (_FR_VALID, _french),
}

NEEDS_PYARROW = frozenset({"wikitext2/train.txt", "wikitext2/valid.txt"})
DOMAINS = tuple(sorted({name.split("/")[0] for name in RECIPES}))


class CorpusMismatch(ValueError):
  """A blob or a rebuilt file whose SHA-256 is not the recorded one."""


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def check_blob(url: str, data: bytes) -> None:
  want, size = BLOBS[url]
  if sha256(data) != want:
    raise CorpusMismatch(f"{url} ({len(data):,} bytes) is not the recorded blob ({size:,} bytes, "
                         f"sha256 {want[:12]}...)")


def build(name: str, blobs: list[bytes]) -> bytes:
  """The file `name` ("french/train.txt") from its sources' bytes, in RECIPES order, checked."""
  _, recipe = RECIPES[name]
  data = recipe(blobs)
  if sha256(data) != EXPECTED[name][0]:
    raise CorpusMismatch(f"{name} rebuilt to {len(data):,} bytes with sha256 "
                         f"{sha256(data)[:12]}..., not the recorded {EXPECTED[name][0][:12]}...")
  return data
