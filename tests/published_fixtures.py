"""Checkpoint files in exactly the layouts the published EDM (NVlabs/edm) and PFGM++
(Newbeeer/pfgmpp) training code writes, made by our own generator (issue 19). Nothing of the
published code is embedded: its facts were read from its train.py, training/training_loop.py,
training/networks.py, training/loss.py, training/augment.py and torch_utils/persistence.py.

What those files are:

* A persistent object (every network module, the loss, the augmentation pipe) pickles as
  ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, ``meta = dict(type='class',
  version=6, module_src=<the source of its module>, class_name=<its class>, state=<its
  __dict__>)``, with no further state. Its ``__dict__`` holds ``_init_args`` / ``_init_kwargs``:
  the constructor arguments. Everything else pickles as usual (``torch.nn.ModuleDict``,
  parameters, ``dnnlib.util.EasyDict``).
* The network's constructor keyword arguments are train.py's ``network_kwargs`` (arch, then
  --cbase/--cres/--nblock, augment_dim=9 when --augment > 0, dropout, use_fp16) followed by
  the ``interface_kwargs`` of training_loop.py, which changed over the PFGM++ history (ERAS:
  ``pfgmv2``/``pfgmpp`` is the PFGM++ switch, ``D`` its --aug_dim, recorded even when the switch
  is off, where it means nothing: D = inf).
* The file layouts (LAYOUTS) of each era: which dict, which keys in which order, pickle.dump of
  eval-mode CPU copies or torch.save of the live modules.

Here our own modules (pfgmpp_fast.networks: the published parameter, buffer and child names)
stand for the published ones. The top-level ``EDMPrecond`` record holds exactly the published
attributes and constructor arguments; nested records carry our modules' own attributes (a
loader reads only their parameters, buffers and children). ``module_src`` is a placeholder that
creates ``marker`` if anything ever executes it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import re
import sys
import types

import torch

from pfgmpp_fast.networks import EDMPrecond

# The published PFGM++ README's checkpoint table: row -> its train.py options, verbatim.
README_ROWS = {
    "cifar10-ncsnpp-D-128": "--cond=0 --arch=ncsnpp --pfgmpp=1 --aug_dim=128",
    "cifar10-ncsnpp-D-2048": "--cond=0 --arch=ncsnpp --pfgmpp=1 --aug_dim=2048",
    "cifar10-ncsnpp-D-2048-conditional": "--cond=1 --arch=ncsnpp --pfgmpp=1 --aug_dim=2048",
    "cifar10-ncsnpp-D-inf": "--cond=0 --arch=ncsnpp",
    "ffhq-ddpm-D-128": "--cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 "
    "--augment=0.15 --pfgmpp=1 --aug_dim=128",
    "ffhq-ddpm-D-inf": "--cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15",
}
# NVlabs/edm README: the training commands of two of its pre-trained models (EDM's own train.py).
EDM_ROWS = {
    "edm-cifar10-32x32-cond-vp": "--cond=1 --arch=ddpmpp",
    "edm-imagenet-64x64-cond-adm": "--cond=1 --arch=adm --duration=2500 --batch=4096 --lr=1e-4 --ema=50 "
    "--dropout=0.10 --augment=0 --fp16=1 --ls=100 --tick=200",
}
# The same networks, small: appended to a row's options (the later value wins, as in click).
SMALL = {
    "ddpmpp": "--cbase=16 --cres=1,2 --nblock=1",
    "ncsnpp": "--cbase=16 --cres=1,2 --nblock=1",
    "adm": "--cbase=64 --cres=1 --nblock=1",
}

# train.py's options and defaults, in declaration order (the order click passes them): the
# opts EasyDict that PFGM++ stores in its EDMLoss. EDM's train.py has no pfgmpp/aug_dim/...
TRAIN_DEFAULTS = dict(
    outdir="training-runs",
    data="datasets/cifar10-32x32.zip",
    name=None,
    cond=False,
    stf=False,
    pfgmpp=False,
    arch="ddpmpp",
    precond="edm",
    duration=200.0,
    rbatch=4096,
    batch=512,
    aug_dim=128,
    batch_gpu=None,
    cbase=None,
    cres=None,
    nblock=None,
    lr=10e-4,
    ema=0.5,
    dropout=0.13,
    augment=0.12,
    xflip=False,
    lsun=False,
    fp16=False,
    ls=1.0,
    bench=True,
    cache=True,
    workers=1,
    desc=None,
    nosubdir=False,
    tick=50,
    snap=50,
    dump=50,
    seed=None,
    transfer=None,
    resume=None,
    dry_run=False,
)

# Per era of training_loop.py / networks.py: the interface arguments added to network_kwargs and
# the attributes EDMPrecond.__init__ sets, in order.
_BASE = ("img_resolution", "img_channels")
_TAIL = ("sigma_min", "sigma_max", "sigma_data")
ERAS = {
    "edm": dict(flags=(), attrs=_BASE + ("label_dim", "use_fp16") + _TAIL),
    # PFGM++ 2022-12-31 .. 2023-01-19 (PFGM++ was called pfgmv2)
    "pfgmv2": dict(
        flags=("pfgm", "pfgmv2", "D"),
        attrs=_BASE + ("D", "N", "label_dim", "pfgm", "pfgmv2", "use_fp16", "small") + _TAIL,
    ),
    # PFGM++ 2023-02-07
    "pfgmpp-feb": dict(
        flags=("pfgm", "pfgmpp", "D"),
        attrs=_BASE + ("D", "N", "label_dim", "pfgm", "pfgmpp", "use_fp16", "small") + _TAIL,
    ),
    # PFGM++ 2023-02-13 .. today
    "pfgmpp": dict(flags=("pfgmpp", "D"), attrs=_BASE + ("D", "N", "label_dim", "pfgmpp", "use_fp16") + _TAIL),
}

# layout -> (era, file name, writer, keys of the saved dict in order). 'pickle': pickle.dump of
# eval-mode CPU copies of the modules; 'torch': torch.save of the live modules (net in training mode).
LAYOUTS = {
    "edm-network-snapshot": (
        "edm",
        "network-snapshot-000100.pkl",
        "pickle",
        ("ema", "loss_fn", "augment_pipe", "dataset_kwargs"),
    ),
    "edm-training-state": ("edm", "training-state-000100.pt", "torch", ("net", "optimizer_state")),
    "pfgmv2-training-state-pt": (
        "pfgmv2",
        "training-state-000100.pt",
        "torch",
        ("net", "optimizer_state", "step", "ema"),
    ),
    "pfgmv2-training-state-pkl": (
        "pfgmv2",
        "training-state-000100.pkl",
        "pickle",
        ("optimizer_state", "step", "ema", "net"),
    ),
    "pfgmpp-feb-training-state-pkl": (
        "pfgmpp-feb",
        "training-state-000100.pkl",
        "pickle",
        ("optimizer_state", "step", "ema", "net"),
    ),
    "pfgmpp-feb-training-state-pt": (
        "pfgmpp-feb",
        "training-state-000100.pt",
        "torch",
        ("optimizer_state", "step", "ema"),
    ),
    "pfgmpp-training-state-ema-pt": ("pfgmpp", "training-state-000100.pt", "torch", ("optimizer_state", "step", "ema")),
    "pfgmpp-training-state-pt": (
        "pfgmpp",
        "training-state-000100.pt",
        "torch",
        ("optimizer_state", "step", "ema", "net"),
    ),
    # EDM's snapshot writer, kept (commented out) in PFGM++'s training_loop.py
    "pfgmpp-network-snapshot": (
        "pfgmpp",
        "network-snapshot-000100.pkl",
        "pickle",
        ("ema", "loss_fn", "augment_pipe", "dataset_kwargs"),
    ),
}
PFGMPP_LAYOUTS = [name for name, (era, *_) in LAYOUTS.items() if era != "edm"]
EDM_LAYOUTS = [name for name, (era, *_) in LAYOUTS.items() if era == "edm"]

_ARCH = {  # train.py --arch
    "ddpmpp": dict(
        model_type="SongUNet",
        embedding_type="positional",
        encoder_type="standard",
        decoder_type="standard",
        channel_mult_noise=1,
        resample_filter=[1, 1],
        model_channels=128,
        channel_mult=[2, 2, 2],
    ),
    "ncsnpp": dict(
        model_type="SongUNet",
        embedding_type="fourier",
        encoder_type="residual",
        decoder_type="standard",
        channel_mult_noise=2,
        resample_filter=[1, 3, 3, 1],
        model_channels=128,
        channel_mult=[2, 2, 2],
    ),
    "adm": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4]),
}
_AUGMENT_DEFAULTS = dict(  # training/augment.py AugmentPipe.__init__, in order
    p=1,
    xflip=0,
    yflip=0,
    rotate_int=0,
    translate_int=0,
    translate_int_max=0.125,
    scale=0,
    rotate_frac=0,
    aniso=0,
    translate_frac=0,
    scale_std=0.2,
    rotate_frac_max=1,
    aniso_std=0.2,
    aniso_rotate_prob=0.5,
    translate_frac_std=0.125,
    brightness=0,
    contrast=0,
    lumaflip=0,
    hue=0,
    saturation=0,
    brightness_std=0.2,
    contrast_std=0.5,
    hue_max=1,
    saturation_std=1,
)
_MODULE_KEYS = tuple(torch.nn.Module().__dict__)  # what torch.nn.Module.__init__ puts in __dict__


# ----------------------------------------------------------------------------------------
# Options -> constructor arguments (what train.py and training_loop.py record)


def parse_options(command_line: str) -> dict:
    """train.py's opts for a command line like '--cond=1 --arch=ncsnpp' (defaults filled in)."""
    opts = dict(TRAIN_DEFAULTS)
    for item in command_line.split():
        m = re.fullmatch(r"--([\w-]+)=(\S+)", item)
        if not m:
            raise ValueError(f"options must be --name=value, got {item!r}")
        key, text = m.group(1).replace("-", "_"), m.group(2)
        default = TRAIN_DEFAULTS[key]
        if key == "cres":
            opts[key] = [int(v) for v in text.split(",")]
        elif isinstance(default, bool):
            opts[key] = bool(int(text))
        elif key in ("cbase", "nblock") or isinstance(default, int):
            opts[key] = int(text)
        elif isinstance(default, float):
            opts[key] = float(text)
        else:
            opts[key] = text
    return opts


def network_kwargs(opts: dict, era: str, resolution: int, channels: int, label_dim: int) -> dict:
    """The EDMPrecond keyword arguments train.py + training_loop.py of ``era`` pass, in order."""
    kw = copy.deepcopy(_ARCH[opts["arch"]])
    if opts["cbase"] is not None:
        kw["model_channels"] = opts["cbase"]
    if opts["cres"] is not None:
        kw["channel_mult"] = list(opts["cres"])
    if opts["nblock"] is not None:
        kw["num_blocks"] = opts["nblock"]
    if opts["augment"]:
        kw["augment_dim"] = 9
    kw.update(dropout=opts["dropout"], use_fp16=opts["fp16"])
    kw.update(img_resolution=resolution, img_channels=channels, label_dim=label_dim)
    flags = dict(pfgm=False, pfgmv2=opts["pfgmpp"], pfgmpp=opts["pfgmpp"], D=opts["aug_dim"])
    kw.update({k: flags[k] for k in ERAS[era]["flags"]})
    return kw


def trained_D(opts: dict) -> float:
    """The D a row's network was trained with: --aug_dim with --pfgmpp=1, else inf (EDM)."""
    return float(opts["aug_dim"]) if opts["pfgmpp"] else float("inf")


def build_row(row_options: str, resolution=16, channels=3, label_dim=10, seed=0, era="pfgmpp"):
    """(opts, kwargs, our EDMPrecond with seeded weights) for a row's options (+ SMALL sizes)."""
    arch = parse_options(row_options)["arch"]
    opts = parse_options(f"{row_options} {SMALL[arch]}")
    label_dim = label_dim if opts["cond"] else 0
    kwargs = network_kwargs(opts, era, resolution, channels, label_dim)
    ours = {k: v for k, v in kwargs.items() if k not in ("pfgm", "pfgmv2", "pfgmpp", "D")}
    torch.manual_seed(seed)
    net = EDMPrecond(**ours, D=trained_D(opts))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return opts, kwargs, net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------
# The persistence format


class Record:
    """An object of a published persistent class (written in its reduced form)."""

    def __init__(self, class_name: str, module: str, state: dict):
        self.class_name, self.module, self.state = class_name, module, state


def _placeholder_source(module: str, marker) -> str:
    return (
        f"# placeholder for the source of {module}, which the published pickles embed\n"
        f"import pathlib; pathlib.Path({str(marker)!r}).write_text('executed')\n"
    )


def precond_record(net: EDMPrecond, kwargs: dict, era: str) -> Record:
    """The published EDMPrecond of ``era`` built with ``kwargs``, holding ``net``'s modules."""
    values = dict(
        img_resolution=kwargs["img_resolution"],
        img_channels=kwargs["img_channels"],
        label_dim=kwargs["label_dim"],
        use_fp16=kwargs["use_fp16"],
        sigma_min=0,
        sigma_max=float("inf"),
        sigma_data=0.5,
        small=False,
        N=kwargs["img_channels"] * kwargs["img_resolution"] ** 2,
        **{k: kwargs[k] for k in ("pfgm", "pfgmv2", "pfgmpp", "D") if k in kwargs},
    )
    state = {k: net.__dict__[k] for k in _MODULE_KEYS}
    state.update({k: values[k] for k in ERAS[era]["attrs"]})
    state.update(_init_args=(), _init_kwargs=copy.deepcopy(kwargs))
    return Record("EDMPrecond", "training.networks", state)


def loss_record(opts: dict, kwargs: dict, era: str) -> Record:
    """training/loss.py EDMLoss as train.py builds it: EDM's without arguments, PFGM++'s with
    EDMLoss(opts=EasyDict(opts), D=--aug_dim, N=C*H*W)."""
    state = dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    init = {}
    if era != "edm":
        N = kwargs["img_channels"] * kwargs["img_resolution"] ** 2
        init = dict(opts=EasyDict(opts), D=opts["aug_dim"], N=N)
        state.update(D=opts["aug_dim"], N=N, gamma=5, opts=EasyDict(opts))
    state.update(_init_args=(), _init_kwargs=init)
    return Record("EDMLoss", "training.loss", state)


def augment_record(opts: dict):
    """train.py's AugmentPipe(p=--augment, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
    translate_frac=1), or None for --augment=0."""
    if not opts["augment"]:
        return None
    init = dict(p=opts["augment"], xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    state = {k: float(init.get(k, v)) for k, v in _AUGMENT_DEFAULTS.items()}
    state.update(_init_args=(), _init_kwargs=init)
    return Record("AugmentPipe", "training.augment", state)


class EasyDict(dict):
    """Stands for dnnlib.util.EasyDict (a dict with attribute access) while pickling."""


def _reconstruct_persistent_obj(meta):
    raise AssertionError("the published reconstruct hook must never be called")


@contextlib.contextmanager
def _published_globals():
    """Registers torch_utils.persistence and dnnlib.util stand-ins, so that pickle names the
    published globals; removes them afterwards."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    modules = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": persistence,
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": util,
    }
    modules["torch_utils"].persistence, modules["dnnlib"].util = persistence, util
    saved = {name: sys.modules.get(name) for name in modules}
    names = [(f, f.__module__, f.__qualname__) for f in (_reconstruct_persistent_obj, EasyDict)]
    _reconstruct_persistent_obj.__module__, _reconstruct_persistent_obj.__qualname__ = (
        "torch_utils.persistence",
        "_reconstruct_persistent_obj",
    )
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    sys.modules.update(modules)
    try:
        yield
    finally:
        for f, module, qualname in names:
            f.__module__, f.__qualname__ = module, qualname
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def _pickler_class(marker):
    class PublishedPickler(pickle.Pickler):
        """Writes Records, and our network modules, the way persistent_class.__reduce__ does."""

        def reducer_override(self, obj):
            if isinstance(obj, Record):
                name, module, state = obj.class_name, obj.module, obj.state
            elif isinstance(obj, torch.nn.Module) and type(obj).__module__ == "pfgmpp_fast.networks":
                name, module, state = type(obj).__name__, "training.networks", dict(obj.__dict__)
            else:
                return NotImplemented
            meta = dict(
                type="class", version=6, module_src=_placeholder_source(module, marker), class_name=name, state=state
            )
            return _reconstruct_persistent_obj, (meta,), None

    return PublishedPickler


# ----------------------------------------------------------------------------------------
# Files


def _training_copy(ema: EDMPrecond) -> EDMPrecond:
    """The training network beside an EMA: other weights (a loader must pick the EMA), training mode."""
    net = copy.deepcopy(ema).train().requires_grad_(True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)
    return net


def _optimizer_state(net: torch.nn.Module) -> dict:
    """An Adam state_dict as train.py's optimizer writes it (one step taken, zero gradients)."""
    params = [p for p in copy.deepcopy(net).parameters()]
    opt = torch.optim.Adam(params, lr=1e-3, betas=[0.9, 0.999], eps=1e-8)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    return opt.state_dict()


def write_layout(path, layout: str, row_options: str, marker, **size):
    """Write ``row_options``' network in ``layout`` to ``path``. Returns (the network a loader
    must find, in eval mode: the EMA, or the training network where the layout has no EMA; the
    D it was trained with; the recorded constructor kwargs)."""
    era, _, writer, keys = LAYOUTS[layout]
    opts, kwargs, ema = build_row(row_options, era=era, **size)
    net = _training_copy(ema)
    if writer == "pickle":  # training_loop.py: eval-mode CPU copies of the modules
        net = copy.deepcopy(net).eval().requires_grad_(False)
    ema_rec, net_rec = precond_record(ema, kwargs, era), precond_record(net, kwargs, era)
    dataset_kwargs = dict(
        class_name="training.dataset.ImageFolderDataset",
        path=opts["data"],
        use_labels=opts["cond"],
        xflip=opts["xflip"],
        cache=opts["cache"],
        resolution=kwargs["img_resolution"],
        max_size=50000,
    )
    items = dict(
        ema=ema_rec,
        net=net_rec,
        loss_fn=loss_record(opts, kwargs, era),
        augment_pipe=augment_record(opts),
        dataset_kwargs=dataset_kwargs,
        optimizer_state=_optimizer_state(net),
        step=100_000,
    )
    data = {k: items[k] for k in keys}
    Pickler = _pickler_class(marker)
    with _published_globals():
        if writer == "pickle":
            buf = io.BytesIO()
            Pickler(buf, protocol=pickle.DEFAULT_PROTOCOL).dump(data)
            with open(path, "wb") as f:
                f.write(buf.getvalue())
        else:
            pickle_module = types.ModuleType("published_pickle")
            pickle_module.Pickler, pickle_module.Unpickler = Pickler, pickle.Unpickler
            torch.save(data, path, pickle_module=pickle_module)
    found = ema if "ema" in keys else copy.deepcopy(net).eval().requires_grad_(False)
    return found, trained_D(opts), kwargs
