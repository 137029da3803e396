"""Criteo click logs (Kaggle ``train.txt`` or the 1TB ``day_0`` ... ``day_23``) as a LightningDataModule.

Both layouts hold one impression per line, tab-separated, no header, 40 fields: ``label``, 13 integer
features ``I1..I13`` and 26 categorical features ``C1..C26`` written as 8 hex digits (a 32-bit hash). An
empty field is a missing value. One module per job:

* :mod:`.parse`: text blocks -> arrays (pyarrow's CSV reader, ``binascii`` for the hashes); a malformed line
  raises :class:`CriteoFormatError` naming the file and line number. Nothing is skipped silently: a damaged
  download should be noticed, not trained on.
* :mod:`.cache`: each source file is parsed once into memory-mappable arrays plus a manifest, rebuilt when the
  source or the format changes, so 45M (or 4B) rows never need to fit in memory.
* :mod:`.layout`: which files a folder holds and DLRM's split (Kaggle days 0-5 train, day 6 halved into
  test/val; terabyte days 0-22 train, day 23 halved). DLRM's dense transform is the same (negatives -> 0, then
  ``log(x + 1)``); its categorical handling with ``--max-ind-range`` is this module's ``raw % table_size``.
* :mod:`.dataset`: :class:`CriteoRows`, the rows of a split read a batch at a time (categoricals hashed then).
* :mod:`.datamodule`: :class:`CriteoDataModule`; its loaders use the shared
  :class:`~sapp_lightning.app.data.base.ShardedBatchSampler` (here also called :data:`CriteoBatchSampler`).

Example (needs the data; :class:`CriteoDataModule` has a runnable one on a tiny file)::

    from sapp_lightning.app.models import CriteoPaperNet, CTRModule

    dm = CriteoDataModule("/data/criteo/train.txt", batch_size=32768, table_size=1_000_000)
    net = CriteoPaperNet(num_dense=dm.num_dense, cardinalities=dm.cardinalities)  # before setup: no parsing yet
    trainer.fit(CTRModule(net), dm)  # batches: (dense float32 [B, 13], cats int64 [B, 26], label float32 [B])
"""

from ..base import ShardedBatchSampler
from .cache import FORMAT_VERSION, load_cache, preprocess
from .datamodule import CriteoDataModule
from .dataset import CriteoRows
from .layout import LAYOUTS, Segment, dlrm_split, halve, kaggle_day_sizes
from .parse import NUM_CATEGORICAL, NUM_DENSE, CriteoArrays, CriteoFormatError, parse_block

CriteoBatchSampler = ShardedBatchSampler  # the name this module's sampler had before it was shared

__all__ = [
    "FORMAT_VERSION",
    "LAYOUTS",
    "NUM_CATEGORICAL",
    "NUM_DENSE",
    "CriteoArrays",
    "CriteoBatchSampler",
    "CriteoDataModule",
    "CriteoFormatError",
    "CriteoRows",
    "Segment",
    "dlrm_split",
    "halve",
    "kaggle_day_sizes",
    "load_cache",
    "parse_block",
    "preprocess",
]
