"""Checkpoints: our safe format round trip, refusal of pickles, trusted import of the published
persistence format (every layout the published EDM / PFGM++ code writes, made by
tests/published_fixtures.py), corrupt files."""

import json
import math
import os
import pickle
import struct

import numpy as np
import published_fixtures as F
import pytest
import torch
from safetensors.torch import load_file, save_file

from pfgmpp_fast import checkpoint as ck
from pfgmpp_fast.networks import EDMPrecond, build_network, make_fast


def _net(arch='ncsnpp', label_dim=3, D=128, **kw):
    torch.manual_seed(0)
    small = dict(model_channels=16, channel_mult=[1, 2], attn_resolutions=[4])
    if arch == 'adm':  # ADM attention needs 64 channels per head: keep it to one level
        small = dict(model_channels=64, channel_mult=[1], attn_resolutions=[8])
    net = build_network(
        arch, resolution=8, channels=2, label_dim=label_dim, D=D, num_blocks=1, dropout=0.0, **{**small, **kw}
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def _outputs(net):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    lab = torch.eye(net.label_dim)[[0, 1, 2]] if net.label_dim else None
    with torch.no_grad():
        return net.eval()(x, sigma, lab)


# ----------------------------------------------------------------------------------------
# Our format.


@pytest.mark.parametrize('arch, D', [('ncsnpp', 128), ('adm', float('inf')), ('ddpmpp', 2048)])
def test_round_trip_bit_exact(tmp_path, arch, D):
    net = _net(arch, D=D, augment_dim=9)
    path = tmp_path / 'net.safetensors'
    ck.save_network(path, net, extra_metadata={'kimg': 12, 'note': 'x'})
    loaded = ck.load_network(path)
    assert isinstance(loaded, EDMPrecond)
    assert ck.network_config(loaded) == ck.network_config(net)
    assert json.loads(json.dumps(ck.network_config(net))) == ck.network_config(net)  # strict JSON
    assert loaded.D == D and loaded.N == net.N and loaded.label_dim == net.label_dim
    sd, sd2 = net.state_dict(), loaded.state_dict()
    assert list(sd) == list(sd2)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(_outputs(net), _outputs(loaded))
    assert ck.read_metadata(path)['extra'] == {'kimg': 12, 'note': 'x'}
    assert ck.load_network(path, D=D).D == D
    with pytest.raises(ValueError, match='network/D mismatch'):
        ck.load_network(path, D=3)
    # no code-executing path: the file is plain safetensors
    assert set(load_file(path)) == set(sd)
    # overwrite in place (atomic replace), no temp files left behind
    ck.save_network(path, loaded)
    assert sorted(os.listdir(tmp_path)) == ['net.safetensors']


def test_save_fast_network_and_channels_last_weights(tmp_path):
    net = _net('ddpmpp')
    fast = make_fast(net, compile=False)  # makes conv weights channels-last
    path = tmp_path / 'fast.safetensors'
    ck.save_network(path, fast)
    loaded = ck.load_network(path)
    sd, sd2 = net.state_dict(), loaded.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # net's conv weights are channels-last now (other conv algorithm): equal to fp32 rounding
    torch.testing.assert_close(_outputs(net), _outputs(loaded), rtol=1e-5, atol=1e-5)


PICKLE_LOOKING = {0x80: 'both', ord('('): '.pkl', ord('}'): '.pkl', ord(']'): '.pkl'}  # first bytes


def _header_length(path):
    with open(path, 'rb') as f:
        return struct.unpack('<Q', f.read(8))[0]


def test_every_header_length_saves_and_loads(tmp_path):
    """The file kind is read from the whole structure: a header length whose low byte looks
    like a pickle opcode (0x80, and '(' '}' ']' for a .pkl name) is still our format."""
    from helpers import tiny_net

    from pfgmpp_fast.safe_pickle import archive_kind

    net = tiny_net(D=8)
    ref = _outputs(net)
    path, pkl = tmp_path / 'net.safetensors', tmp_path / 'net.pkl'
    lengths, traps = set(), []
    for k in range(0, 1200, 8):  # header lengths are multiples of 8 (safetensors' alignment): each once
        ck.save_network(path, net, extra_metadata={'pad': 'x' * k})
        n = _header_length(path)
        lengths.add(n)
        loaded = ck.load_network(path)
        assert torch.equal(_outputs(loaded), ref) and ck.read_metadata(path)['extra']['pad'] == 'x' * k
        if (n & 0xFF) in PICKLE_LOOKING:
            pkl.write_bytes(path.read_bytes())
            assert archive_kind(str(pkl)) == 'safetensors' and torch.equal(_outputs(ck.load_network(pkl)), ref)
            traps.append(n & 0xFF)
    low = min(lengths)
    assert sorted(lengths) == list(range(low, low + 8 * len(lengths), 8)) and len(lengths) == 150
    assert max(lengths) - low >= 1000
    assert traps.count(0x80) >= 4 and traps.count(ord('(')) >= 4 and len(traps) == 9  # '}' ']': not multiples of 8

    # Every integer header length (other writers need not align): the header padded with spaces.
    data = path.read_bytes()
    header = data[8 : 8 + _header_length(path)].rstrip(b' ')
    seen, loads = set(), 0
    for extra in range(1024 + 8):
        padded = header + b' ' * extra
        blob = struct.pack('<Q', len(padded)) + padded + data[8 + _header_length(path) :]
        for target in (tmp_path / 'raw.safetensors', tmp_path / 'raw.pkl'):
            target.write_bytes(blob)
            assert archive_kind(str(target)) == 'safetensors'
        if (len(padded) & 0xFF) in PICKLE_LOOKING or extra % 64 == 0:
            seen.add(len(padded) & 0xFF)
            for target in (tmp_path / 'raw.safetensors', tmp_path / 'raw.pkl'):
                assert torch.equal(_outputs(ck.load_network(target)), ref)
                loads += 1
    assert set(PICKLE_LOOKING) <= seen and loads == 2 * (4 * 4 + 17)


@pytest.mark.parametrize('cut', [0, 5, 8, 40, -1000, -1])
def test_truncated_file_clear_error(tmp_path, cut):
    path = tmp_path / 'net.safetensors'
    ck.save_network(path, _net())
    data = path.read_bytes()
    bad = tmp_path / 'truncated.safetensors'
    bad.write_bytes(data[:cut] if cut else b'')
    with pytest.raises(ValueError, match='truncated') as err:
        ck.load_network(bad)
    assert str(bad) in str(err.value)


def test_corrupt_header_and_foreign_safetensors(tmp_path):
    path = tmp_path / 'net.safetensors'
    ck.save_network(path, _net())
    data = bytearray(path.read_bytes())
    data[12:20] = b'\x00' * 8  # smash the JSON header
    bad = tmp_path / 'corrupt.safetensors'
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match='corrupt'):
        ck.load_network(bad)
    foreign = tmp_path / 'foreign.safetensors'
    save_file({'w': torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match='not a pfgmpp_fast network checkpoint'):
        ck.load_network(foreign)
    with pytest.raises(FileNotFoundError):
        ck.load_network(tmp_path / 'missing.safetensors')


def _rewrite(path, dst, config=None, tensors=None):
    from safetensors import safe_open

    with safe_open(path, 'pt') as f:
        meta = f.metadata()
    t = load_file(path) if tensors is None else tensors
    if config is not None:
        meta['config'] = json.dumps(config)
    if tensors is not None:  # a consistent digest, so the check under test is the one that fires
        from pfgmpp_fast.utils.io_utils import content_digest

        meta['sha256'] = content_digest(t)
    save_file(t, dst, metadata=meta)


def test_config_mismatch_clear_error(tmp_path):
    net = _net('ddpmpp')
    path = tmp_path / 'net.safetensors'
    ck.save_network(path, net)
    cfg = ck.network_config(net)
    wrong = tmp_path / 'wrong.safetensors'
    _rewrite(path, wrong, config={**cfg, 'model_channels': 32})
    with pytest.raises(ValueError, match='do not match the network config') as err:
        ck.load_network(wrong)
    assert 'wrong shape' in str(err.value) and str(wrong) in str(err.value)
    missing = tmp_path / 'missing_key.safetensors'
    t = load_file(path)
    t.pop('model.map_layer0.bias')
    _rewrite(path, missing, tensors=t)
    with pytest.raises(ValueError, match='missing'):
        ck.load_network(missing)
    invalid = tmp_path / 'invalid.safetensors'
    _rewrite(path, invalid, config={**cfg, 'model_type': 'UNet3D'})
    with pytest.raises(ValueError, match='model_type'):
        ck.load_network(invalid)
    nan = tmp_path / 'nan.safetensors'
    t = load_file(path)
    t['model.map_layer0.bias'][0] = float('nan')
    _rewrite(path, nan, tensors=t)
    with pytest.raises(ValueError, match='non-finite'):
        ck.load_network(nan)


# ----------------------------------------------------------------------------------------
# Published pickles: every layout the published EDM / PFGM++ training code writes, for every
# row of the PFGM++ README's checkpoint table, made by tests/published_fixtures.py (our own
# generator of the published persistence format; it embeds no published source).

PUBLISHED_CASES = [(layout, row) for layout in F.PFGMPP_LAYOUTS for row in F.README_ROWS] + [
    (layout, row) for layout in F.EDM_LAYOUTS for row in F.EDM_ROWS
]


def _rows(row):
    return {**F.README_ROWS, **F.EDM_ROWS}[row]


def test_every_published_layout_and_row_is_covered():
    assert len(F.README_ROWS) == 6 and len(F.LAYOUTS) == 9
    assert len(PUBLISHED_CASES) == 7 * 6 + 2 * 2
    finite = [r for r in F.README_ROWS if F.trained_D(F.parse_options(F.README_ROWS[r])) < math.inf]
    assert finite == [
        'cifar10-ncsnpp-D-128',
        'cifar10-ncsnpp-D-2048',
        'cifar10-ncsnpp-D-2048-conditional',
        'ffhq-ddpm-D-128',
    ]


@pytest.mark.parametrize('layout, row', PUBLISHED_CASES)
def test_published_checkpoint_converts_with_its_recorded_D(tmp_path, layout, row):
    """Converts with the D it was trained with (--aug_dim with pfgmpp on, else inf, although
    D=128 is recorded then), outputs equal to those of the network that was written."""
    src = tmp_path / F.LAYOUTS[layout][1]
    marker = tmp_path / 'EXECUTED'
    expected, D, kwargs = F.write_layout(src, layout, _rows(row), marker)
    if not layout.startswith('edm'):
        assert kwargs['D'] == F.parse_options(_rows(row))['aug_dim']  # recorded even for D = inf rows
    ref = _outputs(expected)
    dst = tmp_path / 'converted.safetensors'
    imported = ck.convert_published(src, dst, trust_pickle=True)
    assert imported.D == D and torch.equal(_outputs(imported), ref)
    converted = ck.load_network(dst)
    assert converted.D == D and torch.equal(_outputs(converted), ref)
    assert not marker.exists()  # embedded source never executed


@pytest.mark.parametrize(
    'layout',
    ['edm-training-state', 'pfgmv2-training-state-pkl', 'pfgmpp-feb-training-state-pt', 'pfgmpp-training-state-pt'],
)
def test_a_given_D_is_checked_against_the_recorded_one(tmp_path, layout):
    rows = (
        [F.EDM_ROWS['edm-cifar10-32x32-cond-vp']]
        if layout.startswith('edm')
        else [F.README_ROWS['cifar10-ncsnpp-D-2048-conditional'], F.README_ROWS['ffhq-ddpm-D-inf']]
    )
    for i, row in enumerate(rows):
        src = tmp_path / f'{i}-{F.LAYOUTS[layout][1]}'
        _, D, _ = F.write_layout(src, layout, row, tmp_path / 'EXECUTED')
        assert ck.load_network(src, trust_pickle=True, D='inf' if math.isinf(D) else D).D == D
        wrong = 64.0 if math.isinf(D) else float('inf')
        with pytest.raises(
            ValueError, match=f'D={wrong:g} was given but the network was trained with D={D:g}.*network/D mismatch'
        ):
            ck.load_network(src, trust_pickle=True, D=wrong)
        with pytest.raises(ValueError, match='network/D mismatch'):
            ck.convert_published(src, tmp_path / 'out.safetensors', trust_pickle=True, D=wrong)
    assert not (tmp_path / 'out.safetensors').exists()


def test_convert_command_names_the_recorded_D(tmp_path, capsys):
    from pfgmpp_fast import cli

    src = str(tmp_path / 'training-state-000100.pt')
    F.write_layout(
        src, 'pfgmpp-training-state-pt', F.README_ROWS['cifar10-ncsnpp-D-2048-conditional'], tmp_path / 'EXECUTED'
    )
    dst = str(tmp_path / 'out.safetensors')
    assert cli.main(['convert', src, dst, '--trust-pickle']) == 0
    assert 'D=2048' in capsys.readouterr().out and ck.load_network(dst).D == 2048
    assert cli.main(['convert', src, dst, '--trust-pickle', '--D', '2048']) == 0
    capsys.readouterr()
    assert cli.main(['convert', src, dst, '--trust-pickle', '--D', '128']) == 2
    err = capsys.readouterr().err
    assert 'error: --D:' in err and 'pfgmpp=True, D=2048' in err and 'Traceback' not in err
    edm = str(tmp_path / 'training-state-000200.pt')
    F.write_layout(edm, 'pfgmpp-training-state-pt', F.README_ROWS['cifar10-ncsnpp-D-inf'], tmp_path / 'EXECUTED')
    assert cli.main(['convert', edm, dst, '--trust-pickle', '--D', '128']) == 2
    assert 'pfgmpp=False: D=inf' in capsys.readouterr().err
    assert cli.main(['convert', edm, dst, '--trust-pickle', '--D', 'x']) == 2
    assert 'error: --D:' in capsys.readouterr().err


# Two README rows at the digits' size (1x8x8), in the newest .pt and the historical .pkl layout.
ENTRY_CASES = [('pfgmpp-training-state-pt', 'ffhq-ddpm-D-128'), ('pfgmv2-training-state-pkl', 'ffhq-ddpm-D-inf')]


@pytest.mark.parametrize('layout, row', ENTRY_CASES)
def test_published_checkpoint_through_every_entry_point(tmp_path, capsys, digits_cache, layout, row):
    """generate / fid --network and train --transfer read a published checkpoint with
    --trust-pickle as the network it is, with the D it was trained with."""
    from pfgmpp_fast import cli
    from pfgmpp_fast.utils.io_utils import load_torch_state

    src = str(tmp_path / F.LAYOUTS[layout][1])
    expected, D, _ = F.write_layout(src, layout, F.README_ROWS[row], tmp_path / 'EXECUTED', resolution=8, channels=1)
    ours = str(tmp_path / 'ours.safetensors')
    ck.save_network(ours, expected)  # the same network and D in our format
    sample = ['--seeds', '0-3', '--steps', '2', '--device', 'cpu']
    for net, out in ((src, 'pickle'), (ours, 'ours')):
        trust = ['--trust-pickle'] if net == src else []
        assert (
            cli.main(
                ['generate', '--network', net, *trust, *sample, '--npz', str(tmp_path / f'{out}.npz'), '--no-progress']
            )
            == 0
        )
        assert (
            cli.main(
                [
                    'fid',
                    'calc',
                    '--network',
                    net,
                    *trust,
                    *sample[2:],
                    '--num',
                    '8',
                    '--batch',
                    '8',
                    '--features',
                    'digits',
                    '--digits-cache',
                    digits_cache,
                    '--dest',
                    str(tmp_path / f'{out}-stats.npz'),
                ]
            )
            == 0
        )
    for name in ('{}.npz', '{}-stats.npz'):
        a, b = np.load(tmp_path / name.format('pickle')), np.load(tmp_path / name.format('ours'))
        assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files), name
    capsys.readouterr()
    assert (
        cli.main(
            ['generate', '--network', src, '--trust-pickle', '--D', '64', *sample, '--npz', str(tmp_path / 'x.npz')]
        )
        == 2
    )
    assert 'error: --D:' in capsys.readouterr().err
    run = tmp_path / 'run'
    assert (
        cli.main(
            [
                'train',
                '--outdir',
                str(run),
                '--data',
                'digits',
                '--transfer',
                src,
                '--trust-pickle',
                '--D',
                'inf' if math.isinf(D) else str(D),
                '--batch',
                '16',
                '--duration',
                '0.000016',
                '--tick',
                '0.016',
                '--dump',
                '1',
                '--augment',
                '0.15',
                '--dropout',
                '0.05',
                '--network',
                json.dumps(dict(model_channels=16, channel_mult=[1, 2], num_blocks=1)),
                '--device',
                'cpu',
                '--no-progress',
            ]
        )
        == 0
    )
    state = load_torch_state(str(run / 'training-state-000000.pt'))  # one step at lr 0 (ramp-up)
    assert all(torch.equal(state['net'][k], v) for k, v in expected.state_dict().items())
    assert f'trained with D={D:g}' in capsys.readouterr().out
    assert not (tmp_path / 'EXECUTED').exists()


def test_pickles_refused_without_flag(tmp_path):
    marker = tmp_path / 'EXECUTED'
    snap = tmp_path / 'network-snapshot-000100.pkl'
    state = tmp_path / 'training-state-000100.pt'
    F.write_layout(snap, 'pfgmpp-network-snapshot', F.README_ROWS['cifar10-ncsnpp-D-128'], marker)
    F.write_layout(state, 'pfgmpp-training-state-pt', F.README_ROWS['cifar10-ncsnpp-D-128'], marker)
    plain = tmp_path / 'weights.pt'
    torch.save(_net().state_dict(), plain)
    for path in (snap, state, plain):
        with pytest.raises(ck.UntrustedCheckpointError, match='trust_pickle=True') as err:
            ck.load_network(path)
        assert 'runs code' in str(err.value) and str(path) in str(err.value)
        with pytest.raises(ck.UntrustedCheckpointError):
            ck.convert_published(path, tmp_path / 'out.safetensors')
    assert not (tmp_path / 'out.safetensors').exists() and not marker.exists()


def test_published_switches_that_change_the_model_are_refused(tmp_path):
    """pfgm=True (PFGM's other network head) is refused; pfgmpp=True without a usable D too."""
    from pfgmpp_fast.safe_pickle import PersistentRecord

    rec = PersistentRecord(
        'EDMPrecond',
        dict(_init_args=(), _init_kwargs=dict(img_resolution=8, img_channels=3, pfgm=True, pfgmv2=False, D=128)),
    )
    with pytest.raises(ValueError, match='pfgm=True'):
        ck._published_config('x.pkl', rec, None)
    rec.state['_init_kwargs'] = dict(img_resolution=8, img_channels=3, pfgmpp=True, D='many')
    with pytest.raises(ValueError, match='records pfgmpp=True but no valid D'):
        ck._published_config('x.pkl', rec, None)


def test_trusted_flag_still_runs_no_code(tmp_path):
    """Even with trust_pickle=True, globals outside the allow-list stay inert."""
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    bad = tmp_path / 'network-snapshot-evil.pkl'
    bad.write_bytes(pickle.dumps(dict(ema=Evil())))
    with pytest.raises(ValueError, match='no published network'):
        ck.load_network(bad, trust_pickle=True)
    assert not marker.exists()


def test_truncated_pickle_with_flag(tmp_path):
    snap = tmp_path / 'network-snapshot-000100.pkl'
    F.write_layout(snap, 'edm-network-snapshot', F.EDM_ROWS['edm-cifar10-32x32-cond-vp'], tmp_path / 'EXECUTED')
    cut = tmp_path / 'network-snapshot-cut.pkl'
    cut.write_bytes(snap.read_bytes()[:5000])
    with pytest.raises(ValueError, match='cannot read the pickle') as err:
        ck.load_network(cut, trust_pickle=True)
    assert str(cut) in str(err.value)
