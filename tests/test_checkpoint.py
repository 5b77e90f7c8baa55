"""Checkpoints: our safe format round trip, refusal of pickles, trusted import of the published
persistence format (made here by a stand-in of torch_utils.persistence), corrupt files."""
import io
import json
import math
import os
import pickle
import sys
import types

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
    net = build_network(arch, resolution=8, channels=2, label_dim=label_dim, D=D, num_blocks=1, dropout=0.0,
                        **{**small, **kw})
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
# Published pickles, made here in the published persistence format by a stand-in of
# torch_utils.persistence (the real one embeds module source and executes it on load).

EMBEDDED_SOURCE = 'open(__marker__, "w").write("executed")  # must never run'


@pytest.fixture
def published_format(monkeypatch, tmp_path):
    persistence = types.ModuleType('torch_utils.persistence')

    def _reconstruct_persistent_obj(meta):
        raise AssertionError('the published reconstruct hook must never be called by our loader')
    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    torch_utils = types.ModuleType('torch_utils')
    torch_utils.persistence = persistence
    util = types.ModuleType('dnnlib.util')

    class EasyDict(dict):
        pass
    EasyDict.__module__, EasyDict.__qualname__ = 'dnnlib.util', 'EasyDict'
    util.EasyDict = EasyDict
    dnnlib = types.ModuleType('dnnlib')
    dnnlib.util = util
    for name, mod in [('torch_utils', torch_utils), ('torch_utils.persistence', persistence),
                      ('dnnlib', dnnlib), ('dnnlib.util', util)]:
        monkeypatch.setitem(sys.modules, name, mod)
    marker = tmp_path / 'EXECUTED'

    class PublishedPickler(pickle.Pickler):
        """Pickles our modules the way persistent_class.__reduce__ does."""

        def reducer_override(self, obj):
            if isinstance(obj, torch.nn.Module) and type(obj).__module__ == 'pfgmpp_fast.networks':
                state = dict(obj.__dict__)
                if isinstance(obj, EDMPrecond):
                    kwargs = obj.config()
                    del kwargs['D'], kwargs['N']
                    state['_init_args'], state['_init_kwargs'] = (), kwargs
                meta = dict(type='class', version=6, class_name=type(obj).__name__, state=state,
                            module_src=EMBEDDED_SOURCE.replace('__marker__', repr(str(marker))))
                return _reconstruct_persistent_obj, (meta,)
            return NotImplemented

    class PickleModule:
        Pickler = PublishedPickler
        Unpickler = pickle.Unpickler

    def write_snapshot(path, net, loss_kwargs=None):
        loss = types.SimpleNamespace()  # stands for the persistent EDMLoss; pickled as an opaque global
        snapshot = dict(ema=net, loss_fn=loss, augment_pipe=None, dataset_kwargs=EasyDict(path='cifar10.zip'))
        buf = io.BytesIO()
        PublishedPickler(buf, protocol=4).dump(snapshot)
        path.write_bytes(buf.getvalue())

    def write_training_state(path, net):
        torch.save(dict(net=net, optimizer_state={}), path, pickle_module=PickleModule)

    return types.SimpleNamespace(write_snapshot=write_snapshot, write_training_state=write_training_state, marker=marker)


def test_pickles_refused_without_flag(tmp_path, published_format):
    net = _net()
    snap = tmp_path / 'network-snapshot-000100.pkl'
    state = tmp_path / 'training-state-000100.pt'
    published_format.write_snapshot(snap, net)
    published_format.write_training_state(state, net)
    plain = tmp_path / 'weights.pt'
    torch.save(net.state_dict(), plain)
    for path in (snap, state, plain):
        with pytest.raises(ck.UntrustedCheckpointError, match='trust_pickle=True') as err:
            ck.load_network(path)
        assert 'runs code' in str(err.value) and str(path) in str(err.value)
        with pytest.raises(ck.UntrustedCheckpointError):
            ck.convert_published(path, tmp_path / 'out.safetensors')
    assert not (tmp_path / 'out.safetensors').exists()


@pytest.mark.parametrize('arch, label_dim', [('ncsnpp', 3), ('adm', 0)])
def test_trusted_import_identical_outputs(tmp_path, published_format, arch, label_dim):
    net = _net(arch, label_dim=label_dim, augment_dim=9)
    ref = _outputs(net)
    snap = tmp_path / 'network-snapshot-000100.pkl'
    published_format.write_snapshot(snap, net)
    imported = ck.load_network(snap, trust_pickle=True)
    assert torch.equal(_outputs(imported), ref)
    assert math.isinf(imported.D)  # EDM unless told otherwise
    assert ck.load_network(snap, trust_pickle=True, D=128).D == 128
    state = tmp_path / 'training-state-000100.pt'
    published_format.write_training_state(state, net)
    assert torch.equal(_outputs(ck.load_network(state, trust_pickle=True)), ref)
    dst = tmp_path / 'converted.safetensors'
    ck.convert_published(snap, dst, trust_pickle=True, D=128)
    converted = ck.load_network(dst)
    assert torch.equal(_outputs(converted), ref) and converted.D == 128
    assert not published_format.marker.exists()  # embedded source never executed


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


def test_truncated_pickle_with_flag(tmp_path, published_format):
    snap = tmp_path / 'network-snapshot-000100.pkl'
    published_format.write_snapshot(snap, _net())
    cut = tmp_path / 'network-snapshot-cut.pkl'
    cut.write_bytes(snap.read_bytes()[:5000])
    with pytest.raises(ValueError, match='cannot read the pickle') as err:
        ck.load_network(cut, trust_pickle=True)
    assert str(cut) in str(err.value)
