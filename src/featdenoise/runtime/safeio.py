"""Reading files without running code from them: "nothing runs code from a file".

A pickle can name any importable function and have it called while it loads; ``torch.load``
without ``weights_only``, ``np.load`` with pickles allowed, and ``pickle.load`` all do that. Every
reader in featdenoise goes through one of these helpers instead:

- :func:`safe_torch_load`: ``torch.load(weights_only=True)`` (tensors, numbers, strings and
  plain containers only), errors turned into one line naming the file;
- :func:`read_npz`: ``np.load(allow_pickle=False)``; object arrays are refused;
- :func:`restricted_pickle_load`: for formats that *are* pickles of plain data (the CIFAR-10
  python folder): an unpickler that can rebuild dicts, lists, strings, numbers and numpy arrays
  and nothing else;
- :func:`read_safetensors`: tensors and metadata of a ``.safetensors`` file (a format that cannot
  hold code), with a truncated or foreign file turned into one line naming it.

All raise ``FileNotFoundError`` for a missing file and ``ValueError`` (one line: the file, what
is wrong, what to do) for anything refused or unreadable.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy
from safetensors import SafetensorError, safe_open

# What a truncated or foreign archive raises from inside numpy / zipfile.
_BROKEN = (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, struct.error)

# Deflate cannot shrink data by more than about 1032 to 1; a zip member that says it unpacks
# to more is lying about its size.
_MAX_DEFLATE_RATIO = 1100


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _check_zip_sizes(path: str) -> None:
    """A zip (a ``torch.save`` file) none of whose members says it unpacks to more than its
    compression allows; checked before anything is unpacked."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except _BROKEN:
        return  # the reader's own error names it
    for info in infos:
        _check_member_size(path, info, f"member {info.filename!r}")


def _check_member_size(path: str, info: zipfile.ZipInfo, what: str) -> None:
    """A zip member may not say it unpacks to more than its compression allows (stored: its
    own size; deflated: about 1032 to 1); one line naming ``what`` otherwise."""
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO
    if info.file_size > info.compress_size * ratio + 1024:
        raise ValueError(
            f"{path}: {what} says it unpacks to {info.file_size} bytes from "
            f"{info.compress_size}, more than its compression allows; the file is damaged or "
            "forged: re-create or re-download it")


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; never executes code stored in the file.

    Args:
        path: a ``.pt``/``.pth`` file written by ``torch.save`` of tensors and plain containers.
        map_location: as for ``torch.load`` (default ``"cpu"``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: one line naming the file, when it holds other Python objects (a pickle that
            could run code), is truncated, or is not a torch file at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; check the path")
    _check_zip_sizes(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain "
            f"containers, which could run code ({_first_line(err)}); re-save it as a plain "
            "state dict or safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, AttributeError) as err:
        raise ValueError(
            f"{path}: not a readable torch checkpoint (truncated or another format: "
            f"{_first_line(err)}); re-create or re-download it"
        ) from None


def _npy_header(f, path: str, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, header bytes)`` of the ``.npy`` stream ``f``, read without its data."""
    try:
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npy.read_array_header_1_0(f)
        else:
            shape, _, dtype = npy.read_array_header_2_0(f)
    except (ValueError, TypeError, SyntaxError, *_BROKEN) as err:
        raise ValueError(f"{path}: array {name!r} has no valid npy header ({_first_line(err)}); "
                         "re-create or re-download it") from None
    return tuple(int(d) for d in shape), dtype, f.tell()


def _check_declared(path: str, name: str, shape: tuple[int, ...], dtype: np.dtype,
                    header: int, stored: int) -> None:
    if dtype.hasobject:
        raise ValueError(f"{path}: array {name!r} holds Python objects (pickled), which could "
                         "run code; refused. Store plain numeric arrays only")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize + header
    if declared != stored:
        raise ValueError(f"{path}: array {name!r} declares shape {shape} {dtype} "
                         f"({declared} bytes with its header) but the file stores {stored} bytes; "
                         "the file is damaged or forged: re-create or re-download it")


def check_npz_sizes(path: str | os.PathLike) -> None:
    """Compare what every array of an ``.npz`` (or ``.npy``) file declares with what it stores,
    before anything is allocated: a file of a few hundred bytes can declare a 200000 x 200000
    array, which ``np.load`` would try to allocate first.

    Each member's npy header (shape, dtype) must account for exactly the member's uncompressed
    size, and that size for no more than deflate can unpack from its compressed size.

    Raises:
        ValueError: one line naming the file and the array whose sizes disagree.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":  # a bare .npy file
            f.seek(0)
            shape, dtype, header = _npy_header(f, path, "arr_0")
            _check_declared(path, "arr_0", shape, dtype, header, os.path.getsize(path))
            return
    if not zipfile.is_zipfile(path):
        return  # not an npz: np.load says so (or refuses its pickle)
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                name = info.filename.removesuffix(".npy")
                _check_member_size(path, info, f"array {name!r}")
                with z.open(info) as member:
                    if member.read(6) != b"\x93NUMPY":
                        continue  # np.load gives such a member as its bytes, not an array
                    member.seek(0)
                    shape, dtype, header = _npy_header(member, path, name)
                _check_declared(path, name, shape, dtype, header, info.file_size)
    except _BROKEN as err:
        raise ValueError(f"{path}: not a readable npz file (truncated or another format: "
                         f"{_first_line(err)}); re-create or re-download it") from None


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` (or ``.npy``) file, read with ``allow_pickle=False``.

    Returns:
        ``{name: array}`` in the file's order (an ``.npy`` file gives ``{"arr_0": array}``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: one line naming the file (and the array), for an object (pickled) array, an
            array whose header declares another size than the file stores (checked before
            anything is allocated, :func:`check_npz_sizes`), or for a file that is empty,
            truncated or not an npz at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; check the path")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not an npz; re-create or re-download it")
    check_npz_sizes(path)
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as err:  # numpy's "pickled data" refusal of a .npy, or an unknown format
        raise ValueError(
            f"{path}: not a readable npz file ({_first_line(err)}); it may hold pickled "
            "objects (refused) or be corrupt"
        ) from None
    except _BROKEN as err:
        raise ValueError(
            f"{path}: not a readable npz file (truncated or another format: {_first_line(err)}); "
            "re-create or re-download it"
        ) from None
    if isinstance(data, np.ndarray):
        return {"arr_0": data}
    with data:
        out = {}
        for name in data.files:
            try:
                out[name] = data[name]
            except ValueError as err:
                if "allow_pickle" not in str(err) and "Object arrays" not in str(err):
                    raise ValueError(f"{path}: array {name!r} is unreadable (truncated or "
                                     f"corrupt: {_first_line(err)}); re-create or re-download "
                                     "it") from None
                raise ValueError(
                    f"{path}: array {name!r} holds Python objects (pickled), which could run "
                    f"code; refused ({_first_line(err)}). Store plain numeric arrays only"
                ) from None
            except _BROKEN as err:
                raise ValueError(f"{path}: array {name!r} is unreadable (truncated or corrupt: "
                                 f"{_first_line(err)}); re-create or re-download it") from None
        return out


# The only globals a pickle of plain data and numpy arrays needs. Each only builds an array
# or a dtype from bytes; none can call anything else.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file, name: str, **kwargs):
        super().__init__(file, **kwargs)
        self._name = name

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{self._name}: refused to load: the pickle asks for {module}.{name}, which could run "
            "code; only plain data and numpy arrays are accepted"
        )


def restricted_pickle_load(file: str | os.PathLike | io.BufferedIOBase,
                           encoding: str = "bytes") -> Any:
    """Unpickle plain data (dict, list, str, bytes, numbers, numpy arrays) and nothing else.

    For data formats that are pickles by definition (CIFAR-10 ``cifar-10-batches-py``); a file
    naming any other function or class is refused before anything is called.

    Args:
        file: a path or a binary file object.
        encoding: how Python 2 strings are decoded (``"bytes"`` keeps them as bytes, as the
            CIFAR-10 readers expect).

    Raises:
        ValueError: one line naming the file and the refused global, or for a corrupt pickle.
    """
    if isinstance(file, (str, os.PathLike)):
        path = os.fspath(file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; check the path")
        with open(path, "rb") as f:
            return restricted_pickle_load(f, encoding)
    name = getattr(file, "name", "<pickle>")
    try:
        return _PlainUnpickler(file, str(name), encoding=encoding).load()
    except pickle.UnpicklingError as err:
        msg = _first_line(err, limit=300)
        if msg.startswith(f"{name}:"):
            raise ValueError(msg) from None
        raise ValueError(f"{name}: corrupt pickle ({msg}); re-extract the dataset") from None
    except (EOFError, ValueError, TypeError, IndexError) as err:
        raise ValueError(f"{name}: corrupt pickle ({_first_line(err)}); re-extract it") from None


def _read_safetensors(path: str | os.PathLike, device: str,
                      each: Callable[[Any, str], Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``({key: each(file, key)}, metadata)`` of a ``.safetensors`` file; one line naming the
    file when it is missing, truncated or not a safetensors file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; check the path")
    try:
        with safe_open(path, framework="pt", device=device) as f:
            return {k: each(f, k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{path}: not a readable safetensors file (truncated or another format: "
            f"{_first_line(err)}); re-create or re-download it"
        ) from None


def read_safetensors(path: str | os.PathLike,
                     device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: one line naming the file when it is truncated or not a safetensors file.
    """
    return _read_safetensors(path, device, lambda f, k: f.get_tensor(k))


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _shape_and_dtype(f: Any, key: str) -> tuple[tuple[int, ...], torch.dtype | str]:
    part = f.get_slice(key)
    dtype = part.get_dtype()
    return tuple(part.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype)


def read_safetensors_header(
    path: str | os.PathLike,
) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype | str]], dict[str, str]]:
    """``({key: (shape, dtype)}, metadata)`` of a ``.safetensors`` file, from its header only.

    No tensor is read: what a model built from the metadata must hold can be compared with the
    file before anything is allocated (:func:`featdenoise.runtime.meta.check_fits`). The
    safetensors reader has checked that the declared tensors fill the file exactly. A dtype
    torch does not know stays its safetensors name (``"F8_E4M3"``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: one line naming the file when it is truncated or not a safetensors file.
    """
    return _read_safetensors(path, "cpu", _shape_and_dtype)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file, read from its header only (no tensors).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: one line naming the file when its header is not a safetensors header.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; check the path")
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < size <= 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (no valid header); re-create or "
                             "re-download it")
        raw = f.read(size)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON); re-create "
                         "or re-download it") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def metadata_json(path: str | os.PathLike, meta: dict[str, str], key: str, default: Any,
                  kind: type = dict) -> Any:
    """``json.loads(meta[key])`` (``default`` when absent), checked to be a ``kind``.

    For the JSON entries of safetensors metadata (``model_kwargs``): a file whose entry is not
    valid JSON (a key given twice in one object included: JSON would keep the last), or JSON of
    another type (a list where an object belongs), is refused with one line naming the file and
    the key instead of failing later inside the model builder.
    """
    if key not in meta:
        return default
    text = meta[key]

    def unique(pairs: list) -> dict:
        keys = [k for k, _ in pairs]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise ValueError(f"duplicate key {twice!r}")
        return dict(pairs)

    try:
        value = json.loads(text, object_pairs_hook=unique)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{os.fspath(path)}: metadata {key!r} is not valid JSON "
                         f"({_first_line(err)}); the file is damaged or was not written by "
                         "featdenoise") from None
    if not isinstance(value, kind):
        raise ValueError(f"{os.fspath(path)}: metadata {key!r} must be a JSON "
                         f"{'object' if kind is dict else kind.__name__}, got "
                         f"{type(value).__name__} {_first_line(ValueError(text), 60)}; the file "
                         "is damaged or was not written by featdenoise")
    return value
