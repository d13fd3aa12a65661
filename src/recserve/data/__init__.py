"""Streaming readers of public recommendation datasets, producing recserve requests + labels.

- :class:`CriteoReader` — Criteo display-advertising TSV (label, 13 counts, 26 hashed
  categoricals); :func:`criteo_dlrm_config` builds the DLRM it feeds.
- :class:`AvazuReader` — Avazu CSV (click, hour, 21 categoricals); :func:`avazu_dlrm_config`.
- :class:`MovieLensReader` — MovieLens ratings (``u.data``) as explicit ratings or implicit
  feedback with sampled negatives; :class:`NcfEvalReader` — NCF's ML-1M leave-one-out files;
  :func:`ncf_config`, :func:`hit_ratio_ndcg`.

Every reader yields :class:`LabeledBatch` (a :class:`~recserve.types.Batch` and labels) a
chunk of lines at a time and raises :class:`DataFileError` (a ``ValueError`` naming the file
and line) for malformed input. See :mod:`recserve.data.common` for the hashing and transforms.
"""

from recserve.data.avazu import AvazuReader, avazu_dlrm_config
from recserve.data.common import (
    DataFileError,
    LabeledBatch,
    dlrm_config,
    fnv1a64,
    log_counts,
    make_batch,
)
from recserve.data.criteo import CriteoReader, criteo_dlrm_config
from recserve.data.movielens import (
    MovieLensReader,
    NcfEvalReader,
    hit_ratio_ndcg,
    ncf_config,
)

__all__ = [
    "AvazuReader",
    "CriteoReader",
    "DataFileError",
    "LabeledBatch",
    "MovieLensReader",
    "NcfEvalReader",
    "avazu_dlrm_config",
    "criteo_dlrm_config",
    "dlrm_config",
    "fnv1a64",
    "hit_ratio_ndcg",
    "log_counts",
    "make_batch",
    "ncf_config",
]
