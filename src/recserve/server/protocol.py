"""A model's KServe v2 signature: the named tensors a request carries, and how they become a Batch.

Tensor layout of one inference request of B items (the same over HTTP and gRPC):

==================  ========  ===========  ===============================================
name                datatype  shape        meaning
==================  ========  ===========  ===============================================
``dense``           FP32      ``[B, n]``   dense features, row-major (``n = num_dense``);
                                           optional, and then ``[B, 0]``, when ``n = 0``
``<key>.values``    INT64     ``[N_key]``  ids of feature ``key`` for all B items, item by
                                           item (bag of item 0, then item 1, ...)
``<key>.offsets``   INT64     ``[B + 1]``  bag ``b`` is ``values[offsets[b]:offsets[b+1]]``;
                                           starts at 0, non-decreasing, ends at ``N_key``
``<key>.lengths``   INT64     ``[B]``      instead of offsets: ids per item (>= 0, sum
                                           ``N_key``); give one of offsets and lengths
==================  ========  ===========  ===============================================

``key`` runs over the model's sparse features (:attr:`ModelConfig.feature_keys`): one per
pooled table (the table's name) then one per behaviour sequence. Each id must be in
``[0, rows)`` of its table. The only output is ``scores``: FP32 ``[B, num_tasks]``
probabilities. That is TorchRec's KeyedJaggedTensor split per feature, so a client holding a
KJT sends ``values``/``offsets`` slices as they are, and the server joins them into the
feature-major :class:`~recserve.types.KeyedJagged` the kernels read without re-encoding.

Checks happen in two steps: :meth:`ModelSignature.check_input` on each tensor's header (name,
datatype, rank) before its data is read, then :meth:`ModelSignature.to_batch` for the
relations between tensors, ending in :func:`~recserve.types.validate_batch`. Every failure is an
:class:`~recserve.server.errors.InvalidArgument` naming the tensor (or feature) and the problem.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recserve.config import ModelConfig
from recserve.server.errors import InvalidArgument
from recserve.types import Batch, KeyedJagged, validate_batch

Staging = Callable[[int, int, int, int], "tuple[np.ndarray, np.ndarray, np.ndarray] | None"]
"""Where a decoded batch's arrays go: ``staging(b, num_dense, n_values, n_offsets)`` gives the
dense features (``float32 [b, num_dense]``), values and offsets (``int64``) to write them into,
or None for arrays of the decoder's own (a front end decodes into its shared-memory arena)."""

DENSE = "dense"
OUTPUT = "scores"
VALUES, OFFSETS, LENGTHS = "values", "offsets", "lengths"

# KServe v2 datatypes with a fixed width; all little-endian on the wire.
DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?",
        "UINT8": "u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "INT8": "i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
    }.items()
}


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model's signature; ``-1`` in ``shape`` is a variable size."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class WireTensor:
    """A decoded input tensor: its header and its elements, flat, in the datatype's dtype."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


def element_count(name: str, shape: Sequence[Any]) -> int:
    """Elements of a tensor of ``shape``; every dimension must be a non-negative integer."""
    dims = list(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise InvalidArgument(f"input {name!r}: shape must be a list of integers >= 0, got {dims}")
    return math.prod(dims)


def datatype_dtype(name: str, datatype: Any) -> np.dtype[Any]:
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidArgument(f"input {name!r}: unsupported datatype {datatype!r}")
    return dtype


def tensor_from_bytes(
    name: str, datatype: str, shape: tuple[int, ...], data: bytes | memoryview
) -> WireTensor:
    """A tensor from its raw little-endian bytes (HTTP binary extension, gRPC raw contents)."""
    dtype = datatype_dtype(name, datatype)
    needed = element_count(name, shape) * dtype.itemsize
    if len(data) != needed:
        raise InvalidArgument(
            f"input {name!r}: {len(data)} bytes of data, but shape {list(shape)} of {datatype} "
            f"needs {needed}"
        )
    return WireTensor(name, datatype, shape, np.frombuffer(data, dtype=dtype))


def tensor_from_list(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> WireTensor:
    """A tensor from a (nested) list of numbers in row-major order (JSON ``data``, gRPC
    typed contents)."""
    dtype = datatype_dtype(name, datatype)
    count = element_count(name, shape)
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        arr = np.asarray(None)
    if dtype.kind == "b":
        ok = arr.dtype.kind == "b"
    elif dtype.kind in "iu":
        ok = arr.dtype.kind in "iu" or (arr.size == 0 and arr.dtype.kind == "f")
    else:
        ok = arr.dtype.kind in "iuf"
    if not ok:
        kind = "booleans" if dtype.kind == "b" else "integers" if dtype.kind in "iu" else "numbers"
        raise InvalidArgument(f"input {name!r}: data must be a flat or nested list of {kind}")
    if arr.size != count:
        raise InvalidArgument(
            f"input {name!r}: data has {arr.size} elements, shape {list(shape)} needs {count}"
        )
    flat = arr.reshape(-1)
    if dtype.kind in "iu" and flat.size and flat.dtype.kind in "iu":
        info = np.iinfo(dtype)
        if int(flat.min()) < info.min or int(flat.max()) > info.max:
            raise InvalidArgument(f"input {name!r}: value out of range for {datatype}")
    return WireTensor(name, datatype, shape, flat.astype(dtype, copy=False))


class ModelSignature:
    """The inputs and outputs of one model over KServe v2, and their decoding into a Batch."""

    def __init__(self, config: ModelConfig, max_items: int) -> None:
        self.config = config
        self.max_items = max_items
        self.keys = config.feature_keys
        n = config.num_dense
        dense = TensorSpec(DENSE, "FP32", (-1, n), optional=n == 0)
        required = [dense] if n else []
        optional = [] if n else [dense]
        for key in self.keys:
            required += [
                TensorSpec(f"{key}.{VALUES}", "INT64", (-1,)),
                TensorSpec(f"{key}.{OFFSETS}", "INT64", (-1,)),
            ]
            optional.append(TensorSpec(f"{key}.{LENGTHS}", "INT64", (-1,), optional=True))
        self.inputs: tuple[TensorSpec, ...] = (*required, *optional)
        self.outputs: tuple[TensorSpec, ...] = (TensorSpec(OUTPUT, "FP32", (-1, config.num_tasks)),)
        self._specs = {s.name: s for s in self.inputs}
        f = len(self.keys)
        fast = {f"{key}.{VALUES}": (1 + k, "INT64") for k, key in enumerate(self.keys)}
        fast.update({f"{key}.{OFFSETS}": (1 + f + k, "INT64") for k, key in enumerate(self.keys)})
        if n:
            fast[DENSE] = (0, "FP32")
        self._fast: dict[str, tuple[int, str]] = fast
        """Slot and datatype of each input of the common layout (:meth:`fast_batch`)."""

    def check_input(self, name: Any, datatype: Any, shape: Sequence[Any]) -> tuple[int, ...]:
        """Check one tensor's header against the signature; returns its shape as a tuple."""
        spec = self._specs.get(name) if isinstance(name, str) else None
        if (  # the common, well-formed case in a few operations; errors take the long way
            spec is not None
            and datatype == spec.datatype
            and isinstance(shape, (list, tuple))
            and len(shape) == len(spec.shape)
            and all(
                type(got) is int and got >= 0 and want in (-1, got)
                for want, got in zip(spec.shape, shape)  # noqa: B905 (lengths checked)
            )
        ):
            return tuple(shape)
        if not isinstance(name, str):
            raise InvalidArgument(f"input names must be strings, got {name!r}")
        spec = self._specs.get(name)
        if spec is None:
            expected = ", ".join(s.name for s in self.inputs if not s.optional)
            raise InvalidArgument(
                f"unexpected input tensor {name!r}; model {self.config.name!r} takes {expected} "
                "(each '<key>.offsets' may be replaced by '<key>.lengths')"
            )
        if datatype != spec.datatype:
            raise InvalidArgument(
                f"input {name!r}: expected datatype {spec.datatype}, got {datatype!r}"
            )
        element_count(name, shape)
        dims = tuple(shape)
        if len(dims) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, dims, strict=True)
        ):
            want = "[" + ", ".join("B" if d == -1 else str(d) for d in spec.shape) + "]"
            if spec.name.endswith(VALUES):
                want = "[N] (all ids of the feature, 1-D)"
            raise InvalidArgument(f"input {name!r}: expected shape {want}, got {list(dims)}")
        return dims

    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def to_batch(self, tensors: Mapping[str, WireTensor]) -> Batch:
        """Join checked tensors into a validated :class:`Batch` (copies; never aliases input)."""
        b = self._batch_size(tensors)
        values: list[np.ndarray] = []
        offsets: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        base = 0
        for key in self.keys:
            ids = self._require(tensors, f"{key}.{VALUES}").data
            bag_ends = self._bag_ends(tensors, key, b, ids.size)
            values.append(ids)
            offsets.append(bag_ends + base)
            base += ids.size
        return self._validated(
            self._dense(tensors, b),
            np.concatenate(values).astype(np.int64, copy=False),
            np.concatenate(offsets),
            b,
        )

    def _validated(
        self, dense: torch.Tensor, values: np.ndarray, offsets: np.ndarray, b: int
    ) -> Batch:
        """The batch of joined arrays (feature-major offsets), validated against the model."""
        sparse = KeyedJagged(self.keys, torch.from_numpy(values), torch.from_numpy(offsets), b)
        sparse.key_offsets()
        batch = Batch(dense, sparse)
        try:
            validate_batch(batch, self.config, self.max_items)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        return batch

    def fast_batch(
        self,
        names: Sequence[Any],
        datatypes: Sequence[Any],
        shapes: Sequence[Any],
        buffers: Sequence[bytes | memoryview],
        out: Staging | None = None,
    ) -> Batch | None:
        """The validated batch of a request in the common layout (every tensor raw bytes,
        dense plus each feature's values and offsets, in any order), with a handful of numpy
        calls for all features together; None when the request is in any other form or
        anything about it is off, for :meth:`to_batch` to decode it tensor by tensor and name
        the problem. Validation errors of a well-formed batch raise as in :meth:`to_batch`.
        With ``out``, the arrays are written where it says (one copy of each from the
        request's bytes)."""
        f, nd = len(self.keys), self.config.num_dense
        if len(names) != 2 * f + (1 if nd else 0):
            return None
        slots: list[Any] = [None] * (2 * f + 1)
        for name, datatype, shape, buf in zip(names, datatypes, shapes, buffers, strict=True):
            spec = self._fast.get(name) if type(name) is str else None
            if spec is None or datatype != spec[1] or slots[spec[0]] is not None:
                return None
            slots[spec[0]] = (list(shape), buf)
        if nd:
            shape, dense_buf = slots[0]
            if len(shape) != 2 or type(shape[0]) is not int or type(shape[1]) is not int:
                return None
            if shape[1] != nd:
                return None
            b = shape[0]
            if len(dense_buf) != 4 * b * nd:
                return None
        else:
            shape = slots[1 + f][0]
            if len(shape) != 1 or type(shape[0]) is not int:
                return None
            b = shape[0] - 1
        if not 0 < b <= self.max_items:
            return None
        counts = np.empty(f, dtype=np.int64)
        for k in range(f):
            (vshape, vbuf), (oshape, obuf) = slots[1 + k], slots[1 + f + k]
            if (
                len(vshape) != 1
                or type(vshape[0]) is not int
                or len(vbuf) != 8 * vshape[0]
                or oshape != [b + 1]
                or len(obuf) != 8 * (b + 1)
            ):
                return None
            counts[k] = vshape[0]
        joined = bytearray().join
        per_key = np.frombuffer(joined([s[1] for s in slots[1 + f :]]), dtype="<i8")
        per_key = per_key.reshape(f, b + 1)
        if (per_key[:, 0] != 0).any() or (per_key[:, -1] != counts).any():
            return None
        total = int(counts.sum())
        staged = out(b, nd, total, f * b + 1) if out is not None else None
        if staged is None:
            values = np.frombuffer(joined([s[1] for s in slots[1 : 1 + f]]), dtype="<i8")
            offsets = np.empty(f * b + 1, dtype=np.int64)
        else:
            dense_out, values, offsets = staged
            np.concatenate([np.frombuffer(s[1], "<i8") for s in slots[1 : 1 + f]], out=values)
        bases = np.cumsum(counts) - counts
        offsets[0] = 0
        np.add(per_key[:, 1:], bases[:, None], out=offsets[1:].reshape(f, b))
        if nd:
            flat = np.frombuffer(dense_buf, "<f4").reshape(b, nd)
            if staged is not None:
                np.copyto(dense_out, flat)
                flat = dense_out
            elif not flat.flags.writeable:  # bytes (gRPC): torch wants memory it may write
                flat = flat.copy()
            dense = torch.from_numpy(flat)  # HTTP without staging: a view of the body
        else:
            dense = torch.zeros((b, 0), dtype=torch.float32)
        return self._validated(dense, values, offsets, b)

    def _require(self, tensors: Mapping[str, WireTensor], name: str) -> WireTensor:
        tensor = tensors.get(name)
        if tensor is None:
            hint = f" (or '{name[: -len(OFFSETS)]}{LENGTHS}')" if name.endswith(OFFSETS) else ""
            raise InvalidArgument(f"missing input tensor {name!r}{hint}")
        return tensor

    def _batch_size(self, tensors: Mapping[str, WireTensor]) -> int:
        if self.config.num_dense:
            source = self._require(tensors, DENSE)
            b = source.shape[0]
        elif DENSE in tensors:
            source = tensors[DENSE]
            b = source.shape[0]
        elif not self.keys:
            raise InvalidArgument("model takes no inputs")
        else:
            key = self.keys[0]
            if f"{key}.{LENGTHS}" in tensors:
                source = tensors[f"{key}.{LENGTHS}"]
                b = source.shape[0]
            else:
                source = self._require(tensors, f"{key}.{OFFSETS}")
                b = source.shape[0] - 1
        if b <= 0:
            raise InvalidArgument(
                f"input {source.name!r}: empty batch (a request must carry at least one item)"
            )
        if b > self.max_items:
            raise InvalidArgument(
                f"input {source.name!r}: batch of {b} items is over the limit of {self.max_items}"
            )
        return b

    def _bag_ends(
        self, tensors: Mapping[str, WireTensor], key: str, b: int, n_ids: int
    ) -> np.ndarray:
        """``offsets[1:]`` of one feature (``[B]``), checked against its ``n_ids`` values."""
        off_name, len_name = f"{key}.{OFFSETS}", f"{key}.{LENGTHS}"
        values_name = f"{key}.{VALUES}"
        if off_name in tensors and len_name in tensors:
            raise InvalidArgument(f"give either {off_name!r} or {len_name!r}, not both")
        if len_name in tensors:
            lengths = tensors[len_name].data
            if lengths.size != b:
                raise InvalidArgument(
                    f"input {len_name!r}: expected B = {b} entries, got {lengths.size}"
                )
            if int(lengths.min()) < 0:
                item = int(np.argmax(lengths < 0))
                raise InvalidArgument(f"input {len_name!r}: negative length at item {item}")
            if int(lengths.max()) > n_ids or int(lengths.sum()) != n_ids:
                raise InvalidArgument(
                    f"input {len_name!r}: lengths add up to {int(lengths.sum(dtype=np.float64))}"
                    f", but {values_name!r} has {n_ids} ids"
                )
            return np.cumsum(lengths, dtype=np.int64)
        offsets = self._require(tensors, off_name).data
        if offsets.size != b + 1:
            raise InvalidArgument(
                f"input {off_name!r}: expected B + 1 = {b + 1} entries, got {offsets.size}"
            )
        if int(offsets[0]) != 0:
            raise InvalidArgument(f"input {off_name!r}: must start at 0, starts at {offsets[0]}")
        if int(offsets[-1]) != n_ids:
            raise InvalidArgument(
                f"input {off_name!r}: ends at {offsets[-1]}, but {values_name!r} has {n_ids} ids"
            )
        return offsets[1:]

    def _dense(self, tensors: Mapping[str, WireTensor], b: int) -> torch.Tensor:
        n = self.config.num_dense
        dense = tensors.get(DENSE)
        if dense is None:
            return torch.zeros((b, 0), dtype=torch.float32)
        if dense.shape[0] != b:
            raise InvalidArgument(f"input {DENSE!r}: expected {b} rows, got {dense.shape[0]}")
        data = dense.data if dense.data.flags.writeable else dense.data.copy()
        return torch.from_numpy(data.reshape(b, n))
