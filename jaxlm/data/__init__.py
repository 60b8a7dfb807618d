"""Data: documents -> tokens -> packed rows -> batches, with no download needed to start.

sources   gin-configurable document sources (built-in corpus, text files) and the train/valid split
corpora   the built-in corpus built from the Python installation (stdlib code, reference prose)
tokenizers  text <-> ids
packing   documents -> fixed-length rows with segment ids and positions
pipeline  rows -> train batches by step and fixed eval batches; DataConfig, build_datasets
"""

from jaxlm.data.packing import PackedRows, pack_stream
from jaxlm.data.pipeline import DataConfig, TrainBatches, build_datasets, eval_batches
from jaxlm.data.pipeline import make_examples
from jaxlm.data.sources import builtin_corpus, split_train_valid, text_files
from jaxlm.data.tokenizers import ByteTokenizer
