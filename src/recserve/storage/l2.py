"""Pinning a contiguous range of device memory in L2 (CUDA access-policy window).

Hot-row reordering (:mod:`recserve.storage.hbm`) puts the hot rows of every table in one
contiguous prefix; an access-policy window over that prefix asks the L2 to keep those lines
("persisting") and to stream the rest. It is a stream attribute, set through cuda-bindings;
it needs a set-aside of L2 for persisting lines (a device-wide limit). Whether it helps is
measured, not assumed: 50-60 MiB of L2 already keeps the hottest rows without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class L2Unavailable(RuntimeError):
    """cuda-bindings is missing, or the device has no persisting L2."""


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError as exc:  # optional dependency: pip install recserve[cuda]
        raise L2Unavailable("cuda-bindings is not installed (pip install cuda-bindings)") from exc
    return runtime


def _check(result: Any, what: str) -> Any:
    """cuda-bindings returns ``(err, *values)``; raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise L2Unavailable(f"{what} failed: {err!r}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class L2Limits:
    l2_bytes: int
    max_persisting_bytes: int
    """The largest set-aside of L2 for persisting lines."""
    max_window_bytes: int
    """The largest access-policy window."""


def l2_limits(device: int | None = None) -> L2Limits:
    rt = _cudart()
    dev = torch.cuda.current_device() if device is None else device
    prop = _check(rt.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
    return L2Limits(
        int(prop.l2CacheSize),
        int(prop.persistingL2CacheMaxSize),
        int(prop.accessPolicyMaxWindowSize),
    )


def _stream_handle(stream: torch.cuda.Stream | None) -> Any:
    rt = _cudart()
    s = torch.cuda.current_stream() if stream is None else stream
    return rt.cudaStream_t(s.cuda_stream)


def _attr_value(rt: Any) -> Any:
    """A stream attribute value (``cudaStreamAttrValue``; older bindings: the launch one)."""
    cls = getattr(rt, "cudaStreamAttrValue", None) or rt.cudaLaunchAttributeValue
    return cls()


def _window_attr_id(rt: Any) -> Any:
    for enum_name in ("cudaStreamAttrID", "cudaLaunchAttributeID"):
        enum = getattr(rt, enum_name, None)
        for member in (
            "cudaLaunchAttributeAccessPolicyWindow",
            "cudaStreamAttributeAccessPolicyWindow",
        ):
            if enum is not None and hasattr(enum, member):
                return getattr(enum, member)
    raise L2Unavailable("this cuda-bindings has no access-policy window attribute")


def set_l2_window(
    base_ptr: int,
    num_bytes: int,
    stream: torch.cuda.Stream | None = None,
    set_aside_bytes: int | None = None,
) -> float:
    """Pin ``[base_ptr, base_ptr + num_bytes)`` in L2 for kernels launched on ``stream``.

    Sets aside ``set_aside_bytes`` of L2 (default: as much as the window needs, up to the
    device's maximum) and uses hit ratio ``set-aside / window`` so the persisting lines do not
    thrash each other. Returns that hit ratio. ``num_bytes == 0`` removes the window.
    """
    rt = _cudart()
    limits = l2_limits()
    if num_bytes <= 0:
        clear_l2_window(stream)
        return 0.0
    if limits.max_persisting_bytes <= 0:
        raise L2Unavailable("this device has no persisting L2")
    window = min(num_bytes, limits.max_window_bytes)
    aside = min(set_aside_bytes or window, limits.max_persisting_bytes)
    _check(
        rt.cudaDeviceSetLimit(rt.cudaLimit.cudaLimitPersistingL2CacheSize, aside),
        "cudaDeviceSetLimit(PersistingL2CacheSize)",
    )
    hit_ratio = min(1.0, aside / window)
    value = _attr_value(rt)
    value.accessPolicyWindow.base_ptr = base_ptr
    value.accessPolicyWindow.num_bytes = window
    value.accessPolicyWindow.hitRatio = hit_ratio
    value.accessPolicyWindow.hitProp = rt.cudaAccessProperty.cudaAccessPropertyPersisting
    value.accessPolicyWindow.missProp = rt.cudaAccessProperty.cudaAccessPropertyStreaming
    _check(
        rt.cudaStreamSetAttribute(_stream_handle(stream), _window_attr_id(rt), value),
        "cudaStreamSetAttribute(AccessPolicyWindow)",
    )
    return hit_ratio


def clear_l2_window(stream: torch.cuda.Stream | None = None) -> None:
    """Remove the stream's window and release the persisting lines."""
    rt = _cudart()
    value = _attr_value(rt)
    value.accessPolicyWindow.num_bytes = 0
    value.accessPolicyWindow.hitRatio = 0.0
    _check(
        rt.cudaStreamSetAttribute(_stream_handle(stream), _window_attr_id(rt), value),
        "cudaStreamSetAttribute(AccessPolicyWindow)",
    )
    _check(rt.cudaCtxResetPersistingL2Cache(), "cudaCtxResetPersistingL2Cache")
    _check(
        rt.cudaDeviceSetLimit(rt.cudaLimit.cudaLimitPersistingL2CacheSize, 0),
        "cudaDeviceSetLimit(PersistingL2CacheSize)",
    )
