"""Reading published pickles without running code (used by checkpoint.py with trust_pickle).

Two archive kinds are read, both by :class:`RestrictedUnpickler` only — never by
``torch.load`` or ``torch.jit.load``:

* a plain pickle (``network-snapshot-*.pkl``);
* a ``torch.save`` zip (``training-state-*.pt``): its ``data.pkl`` is unpickled here, and
  its storages are read from the zip's ``data/<key>`` entries as raw bytes.

Every other kind is refused before anything reads it, in particular a TorchScript archive
(a zip with ``code/`` and ``constants.pkl``): ``torch.load`` would hand it to
``torch.jit.load``, which runs the archive's TorchScript (e.g. a ``__setstate__``).

The restricted unpickler maps ``torch_utils.persistence`` objects to inert records (class
name + state; the embedded module source is dropped unread), every global outside a short
allow-list to an inert placeholder, and tensors to plain tensors.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import json
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile

import numpy as np
import torch

__all__ = [
    "PersistentRecord",
    "OpaqueObject",
    "RestrictedUnpickler",
    "archive_kind",
    "read_published",
    "UnsupportedArchiveError",
    "load_array_pickle",
]


class UnsupportedArchiveError(ValueError):
    """A file that is neither a plain pickle nor a torch.save zip of pickled data (e.g. TorchScript)."""


class PersistentRecord:
    """What a ``torch_utils.persistence`` object becomes: its class name and state; its
    embedded module source is dropped unread and never executed."""

    def __init__(self, class_name: str, state: dict, version=None):
        self.class_name = class_name
        self.state = state
        self.version = version

    def __repr__(self):
        return f'PersistentRecord({self.class_name!r})'


class OpaqueObject:
    """Inert stand-in for any other global: records its name, call arguments and state."""

    qualname = '?'

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f'OpaqueObject({self.qualname})'


def _opaque_class(module: str, name: str):
    return type(f'Opaque_{name}', (OpaqueObject,), {'qualname': f'{module}.{name}'})


def _reconstruct_persistent(meta):
    if not isinstance(meta, dict) or 'class_name' not in meta:
        raise ValueError('malformed torch_utils.persistence record')
    state = meta.get('state')
    return PersistentRecord(
        str(meta['class_name']), dict(state) if isinstance(state, dict) else {}, meta.get('version')
    )


def _load_storage_from_bytes(b):
    # A storage pickled by TypedStorage.__reduce__ (torch's legacy, non-zip format); a zip here
    # could be TorchScript, which torch.load would run.
    if bytes(b[:4]) == b'PK\x03\x04':
        raise pickle.UnpicklingError('an embedded storage is a zip archive (possibly TorchScript): refused')
    return torch.load(io.BytesIO(b), map_location='cpu', weights_only=True)


def _safe_reconstructor(cls, base, state):
    if isinstance(cls, type) and issubclass(cls, OpaqueObject):
        obj = cls()
        if state is not None:
            obj.state = state
        return obj
    raise pickle.UnpicklingError(f'copyreg._reconstructor for {cls!r} is not allowed')


def _safe_rebuild_from_type_v2(func, new_type, args, state):
    if func not in (torch._utils._rebuild_tensor_v2,) or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError('tensor rebuild with a disallowed function or type')
    t = func(*args)
    return torch.nn.Parameter(t, requires_grad=False) if new_type is torch.nn.Parameter else t


class _EasyDict(dict):
    pass


_ALLOWED = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent,
    ('dnnlib.util', 'EasyDict'): _EasyDict,
    ('dnnlib', 'EasyDict'): _EasyDict,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('collections', 'defaultdict'): collections.defaultdict,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): torch._utils._rebuild_parameter_with_state,
    ('torch._tensor', '_rebuild_from_type_v2'): _safe_rebuild_from_type_v2,
    ('torch.storage', '_load_from_bytes'): _load_storage_from_bytes,
    ('torch', 'Size'): torch.Size,
    ('torch', 'Tensor'): torch.Tensor,
    ('torch.nn.parameter', 'Parameter'): torch.nn.Parameter,
    ('copyreg', '_reconstructor'): _safe_reconstructor,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice,
    ('builtins', 'complex'): complex,
    ('builtins', 'object'): object,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Allows tensors, containers and persistence records; everything else is inert."""

    def find_class(self, module, name):
        # Python 2 names (torch.save writes protocol 2): __builtin__ -> builtins, copy_reg -> copyreg
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        fn = _ALLOWED.get((module, name))
        if fn is not None:
            return fn
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == 'torch' and name.endswith('Storage') and hasattr(torch, name):
            return getattr(torch, name)  # storage type tags (torch.save zips)
        return _opaque_class(module, name)


# ----------------------------------------------------------------------------------------
# Archive kinds

# What torch.save writes into its zip (under one top-level folder); nothing else is accepted.
_TORCH_SAVE_ENTRY = re.compile(
    r'(data\.pkl|byteorder|version|\.data/version|\.data/serialization_id|'
    r'\.format_version|\.storage_alignment|data/\d+)'
)


def _zip_layout(path: str, zf: zipfile.ZipFile) -> str:
    """The common top-level folder of a torch.save zip; UnsupportedArchiveError for any other zip."""
    names = zf.namelist()
    prefixes = {n.split('/', 1)[0] for n in names}
    code = [n for n in names if n.endswith('constants.pkl') or '/code/' in n]
    if code:
        raise UnsupportedArchiveError(
            f'{path}: this is a TorchScript archive (it holds code: {", ".join(code)[:200]}). '
            'Loading it would run that code (torch.jit.load), so it is refused even with trust_pickle; '
            'only published EDM/PFGM++ pickles (network-snapshot-*.pkl, training-state-*.pt) can be imported.'
        )
    strange = [n for n in names if '/' not in n or not _TORCH_SAVE_ENTRY.fullmatch(n.split('/', 1)[1])]
    if len(prefixes) != 1 or strange or not any(n.endswith('/data.pkl') for n in names):
        raise UnsupportedArchiveError(
            f'{path}: a zip archive that is not a torch.save file of pickled data (unexpected entries: '
            f'{", ".join(strange[:5]) or "no data.pkl"}); refused (only published EDM/PFGM++ pickles can be imported)'
        )
    return prefixes.pop()


_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's limit


def _safetensors_header(path: str, size: int, head: bytes) -> str:
    """'complete': an 8-byte little-endian header length that fits the file, followed by a JSON
    object that parses (a safetensors file); 'damaged': a plausible length followed by the start
    of a JSON object ('{"'), but the rest does not fit or parse; '' otherwise."""
    if len(head) < 10:
        return ''
    (n,) = struct.unpack('<Q', head[:8])
    if not 2 <= n <= _SAFETENSORS_MAX_HEADER or head[8:9] != b'{':
        return ''
    if 8 + n <= size:
        with open(path, 'rb') as f:
            f.seek(8)
            try:
                if isinstance(json.loads(f.read(n)), dict):
                    return 'complete'
            except ValueError:  # not UTF-8 or not JSON
                pass
    return 'damaged' if head[8:10] == b'{"' else ''


def archive_kind(path: str) -> str:
    """What a file is, by its whole structure (never by one byte): 'safetensors' (a header that
    parses and fits the file, or a damaged one, which the loader reports as truncated or
    corrupt), 'zip' (a torch.save zip of pickled data), 'pickle'; UnsupportedArchiveError for
    TorchScript and other zips; 'unknown' otherwise."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(16)
    header = _safetensors_header(path, size, head)
    if header == 'complete':
        return 'safetensors'
    if head[:4] == b'PK\x03\x04':
        try:
            with zipfile.ZipFile(path) as zf:
                _zip_layout(path, zf)
        except zipfile.BadZipFile as e:
            raise UnsupportedArchiveError(f'{path}: a corrupt or truncated zip archive ({e})') from None
        return 'zip'
    if header == 'damaged':
        return 'safetensors'
    if head[:1] == b'\x80' or (head[:1] in (b'(', b'}', b']') and path.endswith('.pkl')):
        return 'pickle'
    return 'unknown'


# ----------------------------------------------------------------------------------------
# Reading


class _ZipUnpickler(RestrictedUnpickler):
    """data.pkl of a torch.save zip: storages come from the zip's data/<key> entries."""

    def __init__(self, f, zf: zipfile.ZipFile, prefix: str):
        super().__init__(f)
        self.zf, self.prefix, self.storages = zf, prefix, {}

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ('storage', b'storage')):
            raise pickle.UnpicklingError(f'unsupported persistent id {str(pid)[:80]}')
        _, storage_type, key, _location, numel = pid
        with warnings.catch_warnings():  # published pickles name the legacy typed storage classes
            warnings.filterwarnings('ignore', message='TypedStorage is deprecated')
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, 'dtype', None)
        if not (isinstance(storage_type, type) and isinstance(dtype, torch.dtype)):
            raise pickle.UnpicklingError(f'unsupported storage type {storage_type!r}')
        key = str(key.decode() if isinstance(key, bytes) else key)
        if key not in self.storages:
            if not key.isdigit():
                raise pickle.UnpicklingError(f'bad storage key {key!r}')
            raw = self.zf.read(f'{self.prefix}/data/{key}')
            nbytes = int(numel) * torch.empty((), dtype=dtype).element_size()
            if len(raw) != nbytes:
                raise pickle.UnpicklingError(f'storage {key}: {len(raw)} bytes, expected {nbytes}')
            untyped = (
                torch.frombuffer(bytearray(raw), dtype=torch.uint8).untyped_storage()
                if raw
                else torch.UntypedStorage(0)
            )
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self.storages[key]


def _read_zip(path: str):
    with zipfile.ZipFile(path) as zf:
        prefix = _zip_layout(path, zf)
        names = set(zf.namelist())
        if f'{prefix}/byteorder' in names and zf.read(f'{prefix}/byteorder').decode().strip() != sys.byteorder:
            raise UnsupportedArchiveError(f'{path}: written on a machine of another byte order')
        with zf.open(f'{prefix}/data.pkl') as f:
            return _ZipUnpickler(io.BytesIO(f.read()), zf, prefix).load()


def read_published(path: str, kind: str):
    """The unpickled object of a plain pickle ('pickle') or torch.save zip ('zip'), read only
    through the restricted unpickler; ValueError naming the file if it cannot be read."""
    try:
        if kind == 'zip':
            return _read_zip(path)
        if kind != 'pickle':
            raise UnsupportedArchiveError(f'{path}: not a pickle or a torch.save zip ({kind})')
        with open(path, 'rb') as f:
            return RestrictedUnpickler(f).load()
    except UnsupportedArchiveError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        zipfile.BadZipFile,
        RuntimeError,
        ValueError,
        AttributeError,
        IndexError,
        KeyError,
        TypeError,
        struct.error,
    ) as e:
        raise ValueError(
            f'{path}: cannot read the pickle (truncated, corrupt or not a published '
            f'EDM/PFGM++ checkpoint): {type(e).__name__}: {e}'
        ) from None


# ----------------------------------------------------------------------------------------
# Pickled numpy arrays (e.g. the CIFAR-10 python batches)


def _numeric_dtype(*args):
    dtype = np.dtype(*[a.decode('latin1') if isinstance(a, bytes) else a for a in args])
    if dtype.kind not in 'biuf':
        raise pickle.UnpicklingError(f'only numeric numpy arrays can be read, not dtype {dtype}')
    return dtype


def _latin1_bytes(text, encoding='latin1'):
    # How Python 3 writes bytes at pickle protocol 2: _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError('_codecs.encode is only allowed for latin-1 bytes')
    return text.encode('latin1')


def _array_globals():
    allowed = {
        ('numpy', 'ndarray'): np.ndarray,
        ('numpy', 'dtype'): _numeric_dtype,
        ('_codecs', 'encode'): _latin1_bytes,
    }
    for core in ('numpy.core', 'numpy._core'):
        allowed[(f'{core}.multiarray', '_reconstruct')] = _reconstruct_array
        allowed[(f'{core}.numeric', '_frombuffer')] = _array_from_buffer
    return allowed


def _reconstruct_array(cls, shape, typecode):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError('only plain numpy arrays can be read')
    return np.ndarray.__new__(
        np.ndarray, shape, np.dtype(typecode.decode('latin1') if isinstance(typecode, bytes) else typecode)
    )


def _array_from_buffer(buffer, dtype, shape, order):
    return np.frombuffer(buffer, dtype=_numeric_dtype(dtype)).reshape(shape, order=order)


class _ArrayUnpickler(pickle.Unpickler):
    """Plain containers, numbers, strings, bytes and numeric numpy arrays; any other global is refused."""

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        fn = _array_globals().get((_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        if fn is None:
            raise pickle.UnpicklingError(
                f'global {module}.{name} is not allowed (only numeric numpy arrays and plain containers are read)'
            )
        return fn

    def persistent_load(self, pid):
        raise pickle.UnpicklingError('persistent ids are not allowed')


def load_array_pickle(f, name: str):
    """Unpickle dicts/lists of numbers, strings, bytes and numeric numpy arrays (Python 2 str
    as bytes, like ``pickle.load(encoding='bytes')``) without running code from ``f``;
    ValueError naming ``name`` for anything else or a corrupt stream."""
    try:
        obj = _ArrayUnpickler(f, encoding='bytes').load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        struct.error,
    ) as e:
        raise ValueError(
            f'{name}: cannot read the pickled arrays (corrupt, truncated or holding objects '
            f'other than numeric arrays): {type(e).__name__}: {e}'
        ) from None
    for value in obj.values() if isinstance(obj, dict) else [obj]:
        if isinstance(value, np.ndarray) and value.dtype.kind not in 'biuf':
            raise ValueError(f'{name}: holds a non-numeric array ({value.dtype})')
    return obj
