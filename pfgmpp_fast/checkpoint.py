"""Network checkpoints: our safe format, and a trusted import of published EDM / PFGM++ pickles.

Our format is one safetensors file: the ``state_dict`` (keys ``model.*``, as published) plus,
in the safetensors metadata, the network config as JSON. Loading it never executes code.

Published EDM / PFGM++ checkpoints are pickles of a dict holding the network: EDM's
``network-snapshot-*.pkl`` (``'ema'``, ``'loss_fn'``, ...) and ``training-state-*.pt``
(``'net'``); PFGM++'s ``training-state-*.pt`` (a ``torch.save`` zip) or, in its earlier
versions, ``training-state-*.pkl`` (a plain pickle), with ``'ema'`` (and ``'net'``,
``'optimizer_state'``, ``'step'``). We take ``'ema'``, else ``'net'``. Their classes come from
``torch_utils.persistence``: unpickling them with the published code executes the Python
source embedded in the file. We refuse them unless the caller passes ``trust_pickle=True``, and
even then we never execute that source: a restricted unpickler maps the persistent classes to
inert records (class name + state), every unknown global to an inert placeholder, and tensors
to plain tensors (safe_pickle.py; a zip is read entry by entry, never by torch.load).
TorchScript archives and any other kind of file are refused before anything reads them. We then
build our own network from the recorded constructor arguments, with the D the network was
trained with (the recorded ``D`` when its PFGM++ switch ``pfgmpp`` / ``pfgmv2`` is on, else
inf), and copy the weights in, strictly.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import struct

import torch

from pfgmpp_fast import checks
from pfgmpp_fast.networks import EDMPrecond, FastNetwork
from pfgmpp_fast.safe_pickle import (
    OpaqueObject,
    PersistentRecord,
    UnsupportedArchiveError,
    archive_kind,
    read_published,
)
from pfgmpp_fast.utils.cli_errors import InvalidArgument, InvalidValue, UsageError, blame, check_output_path, command
from pfgmpp_fast.utils.io_utils import atomic_write_bytes, content_digest

__all__ = [
    'save_network',
    'load_network',
    'convert_published',
    'network_config',
    'network_from_config',
    'UntrustedCheckpointError',
    'UnsupportedArchiveError',
    'FORMAT',
]

FORMAT = 'pfgmpp_fast.network.v1'
PICKLE_REFUSAL = (
    '{path}: this is a pickle ({kind}). Unpickling runs code stored in the file '
    '(published EDM/PFGM++ checkpoints embed Python source that the published loader '
    'executes), so it is refused by default. If you trust where the file comes from, pass '
    'trust_pickle=True (CLI: --trust-pickle) to import it; we then read only the constructor '
    'arguments and weights (without executing the embedded source) and you can convert it to '
    'our safe format with convert_published().'
)


class UntrustedCheckpointError(ValueError):
    """A pickle-based checkpoint was given without ``trust_pickle=True``."""


# ----------------------------------------------------------------------------------------
# Config <-> JSON.


def _to_json_value(v):
    if isinstance(v, float) and math.isinf(v):
        return 'inf' if v > 0 else '-inf'
    if isinstance(v, (list, tuple)):
        return [_to_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _to_json_value(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, 'item') and getattr(v, 'ndim', 1) == 0:  # numpy / torch scalar
        return _to_json_value(v.item())
    raise TypeError(f'network config value {v!r} ({type(v).__name__}) is not JSON-serialisable')


def _from_json_value(key, v):
    if key in ('sigma_max', 'sigma_min', 'D') and isinstance(v, str):
        return float(v)
    return v


def network_config(net) -> dict:
    """JSON-serialisable constructor arguments of an :class:`EDMPrecond` (or a FastNetwork)."""
    if isinstance(net, FastNetwork):
        net = net.net
    if not isinstance(net, EDMPrecond):
        raise TypeError(f'net must be an EDMPrecond or FastNetwork, got {type(net).__name__}')
    return _to_json_value(net.config())


def network_from_config(config: dict, device='cpu') -> EDMPrecond:
    if not isinstance(config, dict):
        raise ValueError(f'network config must be a dict, got {type(config).__name__}')
    kwargs = {k: _from_json_value(k, v) for k, v in config.items()}
    with torch.device(device):
        return EDMPrecond(**kwargs)


# ----------------------------------------------------------------------------------------
# Snapshots of a run directory.

_KIMG_RE = re.compile(r"(\d+)\.(safetensors|pkl|pt)$")


def find_checkpoints(run_dir: str) -> list:
    """[(kimg, path)] of network snapshots in a run directory, sorted by kimg (the number at
    the end of the file name: network-snapshot-000200.safetensors → 200)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    out = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), "*")):
        name = os.path.basename(path)
        m = _KIMG_RE.search(name)
        if m and ("snapshot" in name or "network" in name) and not name.startswith("."):
            out.append((int(m.group(1)), path))
    if not out:
        raise ValueError(f"no network snapshots (network-snapshot-<kimg>.safetensors) in {run_dir}")
    return sorted(out)


def find_latest_snapshot(run_dir: str):
    """Path of the snapshot with the largest kimg in ``run_dir`` (None if there is none)."""
    try:
        return find_checkpoints(run_dir)[-1][1]
    except (FileNotFoundError, ValueError):
        return None


# ----------------------------------------------------------------------------------------
# Our format.


def _safetensors_bytes(tensors: dict, metadata: dict) -> bytes:
    """safetensors bytes with a deterministic header (sorted keys; safetensors itself writes
    the metadata in hash-map order), so identical networks give identical files."""
    from safetensors.torch import save as st_save

    data = st_save(tensors, metadata=metadata)
    (n,) = struct.unpack('<Q', data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(',', ':')).encode()
    header += b' ' * (-len(header) % 8)  # safetensors' alignment of the data section
    return struct.pack('<Q', len(header)) + header + data[8 + n :]


def save_network(path, net, extra_metadata: dict | None = None) -> None:
    """Write ``net`` (EDMPrecond or FastNetwork) as safetensors + JSON config + the SHA-256 of
    its tensors, atomically. Non-finite weights are refused (nothing is written)."""
    config = network_config(net)
    if extra_metadata is not None and not isinstance(extra_metadata, dict):
        raise TypeError(f'extra_metadata must be a dict or None, got {type(extra_metadata).__name__}')
    tensors = {k: v.detach().to('cpu').contiguous() for k, v in net.state_dict().items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(
            f'{path}: refusing to write a network with non-finite values (NaN/Inf) in '
            f'{len(bad)} tensors, e.g. {bad[:3]}'
        )
    metadata = {
        'format': FORMAT,
        'config': json.dumps(config, sort_keys=True),
        'extra': json.dumps(_to_json_value(extra_metadata or {}), sort_keys=True),
        'torch_version': torch.__version__,
        'sha256': content_digest(tensors),
    }
    atomic_write_bytes(path, _safetensors_bytes(tensors, metadata))


def _read_safetensors(path: str):
    from safetensors.torch import load as st_load

    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        data = f.read()
    if size < 8:
        raise ValueError(f'{path}: truncated file ({size} bytes): not a pfgmpp_fast checkpoint')
    (header_len,) = struct.unpack('<Q', data[:8])
    if 8 + header_len > size:
        raise ValueError(
            f'{path}: truncated or corrupt checkpoint: header says {header_len} header bytes, file has {size - 8}'
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError as e:
        raise ValueError(f'{path}: corrupt checkpoint header ({e})') from None
    metadata = header.get('__metadata__') or {}
    if metadata.get('format') != FORMAT:
        raise ValueError(
            f'{path}: not a pfgmpp_fast network checkpoint (metadata format='
            f'{metadata.get("format")!r}, expected {FORMAT!r})'
        )
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f'{path}: truncated or corrupt checkpoint ({type(e).__name__}: {e})') from None
    digest = metadata.get('sha256')  # absent in files written before digests existed
    if digest is not None and digest != content_digest(tensors):
        raise ValueError(
            f'{path}: corrupt checkpoint: the weights do not match the SHA-256 digest stored in the '
            f'file (changed on disk after it was written)'
        )
    try:
        config = json.loads(metadata['config'])
        extra = json.loads(metadata.get('extra', '{}'))
    except (KeyError, ValueError) as e:
        raise ValueError(f'{path}: corrupt network config in checkpoint metadata ({e})') from None
    return tensors, config, extra


def _load_weights_strict(path: str, net: EDMPrecond, state: dict) -> None:
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f'{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}'
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:

        def short(items):
            return ', '.join(items[:5]) + (f' ... (+{len(items) - 5})' if len(items) > 5 else '')

        parts = [
            f'{len(missing)} missing ({short(missing)})' if missing else '',
            f'{len(unexpected)} unexpected ({short(unexpected)})' if unexpected else '',
            f'{len(wrong)} with wrong shape ({short(wrong)})' if wrong else '',
        ]
        raise ValueError(f'{path}: weights do not match the network config: ' + '; '.join(p for p in parts if p))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f'{path}: non-finite values (NaN/Inf) in {len(bad)} tensors, e.g. {bad[:3]}')
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])


def load_network(path, device='cpu', trust_pickle: bool = False, D=None) -> EDMPrecond:
    """Load a network with the D it was trained with. Our safetensors format loads without
    executing code. Published EDM / PFGM++ pickles (``network-snapshot-*.pkl``,
    ``training-state-*.pt`` / ``.pkl``) are refused unless ``trust_pickle=True``; their D is the
    recorded one when the PFGM++ switch (``pfgmpp``, earlier ``pfgmv2``) is on, else
    float('inf') (EDM). A given ``D`` ('inf' or a number) must equal the network's: a mismatch
    is an error naming both."""
    path = os.fspath(path)
    D = None if D is None else checks.parse_D(D)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such checkpoint file')
    kind = archive_kind(path)  # refuses TorchScript and other archive kinds before any loader
    if kind in ('pickle', 'zip'):
        if not trust_pickle:
            raise UntrustedCheckpointError(
                PICKLE_REFUSAL.format(path=path, kind='torch.save zip' if kind == 'zip' else 'pickle')
            )
        return _import_published(path, kind, device, D)
    if kind != 'safetensors':
        raise ValueError(f'{path}: unrecognised or truncated checkpoint (neither our safetensors format nor a pickle)')
    tensors, config, _ = _read_safetensors(path)
    try:
        net = network_from_config(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{path}: invalid network config in checkpoint: {e}') from None
    if D is not None and D != float(net.D):
        detail = (
            f'{D:g} was given but the network was trained with D={float(net.D):g} '
            f'(a network/D mismatch; omit D to use the network\'s)'
        )
        raise InvalidValue('D', detail, message=f'{path}: D={detail}')
    _load_weights_strict(path, net, tensors)
    return net.to(device)


def read_metadata(path) -> dict:
    """(config, extra metadata) of one of our checkpoints, without building the network."""
    _, config, extra = _read_safetensors(os.fspath(path))
    return dict(config=config, extra=extra)


def convert_published(src, dst, trust_pickle: bool = False, D=None) -> EDMPrecond:
    """Import a published EDM / PFGM++ pickle (needs ``trust_pickle=True``) and save it in our format."""
    net = load_network(src, trust_pickle=trust_pickle, D=D)
    save_network(dst, net, extra_metadata={'converted_from': os.path.basename(os.fspath(src))})
    return net


# ----------------------------------------------------------------------------------------
# Import of the published persistence format (read by safe_pickle, never executed).


def _collect_state(obj, prefix, out: dict) -> None:
    state = obj.state if isinstance(obj, (PersistentRecord, OpaqueObject)) else None
    if not isinstance(state, dict):
        raise ValueError(f'unexpected object at {prefix or "<root>"}: {obj!r}')
    for name, p in (state.get('_parameters') or {}).items():
        if p is not None:
            out[prefix + name] = p.detach()
    non_persistent = state.get('_non_persistent_buffers_set') or set()
    for name, b in (state.get('_buffers') or {}).items():
        if b is not None and name not in non_persistent:
            out[prefix + name] = b.detach()
    for name, m in (state.get('_modules') or {}).items():
        if m is not None:
            _collect_state(m, prefix + name + '.', out)


# The published EDMPrecond constructors record, beside our arguments: the PFGM++ switch (named
# pfgmv2 until February 2023) and D, which means something only when the switch is on (the
# published default D=128 is recorded for EDM runs too); pfgm, PFGM's other network head; small,
# stored and used nowhere (PFGM++ January/February 2023).
_PFGMPP_SWITCHES = ('pfgmpp', 'pfgmv2')
_PUBLISHED_ONLY = _PFGMPP_SWITCHES + ('D', 'pfgm', 'small', 'class_name')


def _recorded_D(path: str, rec: PersistentRecord, kwargs: dict) -> tuple:
    """(D, what the file says): the recorded D when the PFGM++ switch is on, else inf (EDM)."""

    def recorded(key):
        return kwargs[key] if key in kwargs else rec.state.get(key)

    switch = next((k for k in _PFGMPP_SWITCHES if recorded(k) is not None), None)
    if switch is None:
        return float('inf'), 'an EDM network (no PFGM++ switch): D=inf'
    if not bool(recorded(switch)):
        return float('inf'), f'{switch}=False: D=inf (EDM; its recorded D={recorded("D")!r} is unused)'
    D = recorded('D')
    try:
        D = checks.check_D(D)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{path}: the network records {switch}=True but no valid D ({e})') from None
    return D, f'{switch}=True, D={D:g}'


def _published_config(path: str, rec: PersistentRecord, D) -> dict:
    """Our EDMPrecond arguments for a published network record; a given ``D`` (a float) must
    equal the D the network was trained with."""
    if rec.class_name != 'EDMPrecond':
        raise ValueError(
            f'{path}: network class {rec.class_name!r} is not supported (only EDMPrecond; '
            f'VP/VE/iDDPM preconditionings are different models)'
        )
    init_args = rec.state.get('_init_args') or ()
    kwargs = rec.state.get('_init_kwargs')
    if init_args or not isinstance(kwargs, dict):
        raise ValueError(f'{path}: the pickle does not record the EDMPrecond constructor keyword arguments')
    if kwargs.get('pfgm'):
        raise ValueError(
            f'{path}: published option pfgm={kwargs["pfgm"]!r} (PFGM, a different network head) is not supported'
        )
    trained_D, said = _recorded_D(path, rec, kwargs)
    if D is not None and D != trained_D:
        detail = (
            f'{D:g} was given but the network was trained with D={trained_D:g} ({said}): '
            'a network/D mismatch; omit D to use the recorded one'
        )
        raise InvalidValue('D', detail, message=f'{path}: D={detail}')
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items() if k not in _PUBLISHED_ONLY}
    config.setdefault('model_type', 'DhariwalUNet')  # the published EDMPrecond default
    config['D'] = trained_D
    return config


def _import_published(path: str, kind: str, device, D) -> EDMPrecond:
    snapshot = read_published(path, kind)
    if not isinstance(snapshot, dict):
        raise ValueError(
            f'{path}: expected a dict with an "ema" (network snapshot) or "net" (training state) '
            f'entry, got {type(snapshot).__name__}'
        )
    rec = snapshot.get('ema', snapshot.get('net'))
    if not isinstance(rec, PersistentRecord):
        raise ValueError(
            f'{path}: no published network ("ema" or "net" entry of the persistence format) found; '
            f'keys: {sorted(map(str, snapshot))}'
        )
    config = _published_config(path, rec, D)
    try:
        net = network_from_config(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{path}: cannot build a network from the published arguments {config}: {e}') from None
    state = {}
    _collect_state(rec, '', state)
    _load_weights_strict(path, net, state)
    return net.to(device)


# ----------------------------------------------------------------------------------------
# CLI: `python -m pfgmpp_fast convert SRC DST --trust-pickle` (cli.py COMMANDS entry).


def add_arguments(p) -> None:
    p.add_argument('src', help='published network-snapshot-*.pkl or training-state-*.pt')
    p.add_argument('dst', help='output .safetensors (our format: weights + JSON config, loads without code)')
    p.add_argument(
        '--trust-pickle',
        action='store_true',
        help='confirm you trust SRC: pickles can run code (we read only arguments and weights)',
    )
    p.add_argument(
        '--D',
        default=None,
        help="check that SRC was trained with this D ('inf' = EDM; default: "
        "what SRC records: its D with pfgmpp=1, inf otherwise)",
    )


@command
def main(args) -> int:
    check_output_path('DST', args.dst)
    with blame('--D'):
        D = None if args.D is None else checks.parse_D(args.D)
    try:
        net = load_network(args.src, trust_pickle=args.trust_pickle, D=D)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        named_D = isinstance(exc, InvalidArgument) and exc.name == 'D'  # a network/D mismatch
        raise UsageError('--D' if named_D else 'SRC', str(exc)) from None
    save_network(args.dst, net, extra_metadata={'converted_from': os.path.basename(os.fspath(args.src))})
    n = sum(p.numel() for p in net.parameters())
    print(f'wrote {args.dst}: {net.model_type}, {n:,} parameters, D={net.D}, label_dim={net.label_dim}')
    return 0
