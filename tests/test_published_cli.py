"""The published PFGM++ command lines (its README.md, docs/*-help.txt and command.sh), verbatim
after the script name (``torchrun ... train.py ARGS`` → ``python -m pfgmpp_fast train ARGS``),
resolved through ``--dry-run`` with the published meaning; the published options refused on
purpose, with their messages; the published generate/fid flows over a run directory run for
real; and run directories (a fresh run never goes where another run's files are).

Each test runs in a fresh working directory holding the files the command lines name
(``datasets/cifar10-32x32.zip``, ``training-runs/exp_name``, ...), so the paths stay verbatim;
only URLs (and the README's placeholders ``arch``, ``aug_dim``, ``resume_path``) are replaced.
"""

import io
import json
import math
import os
import pickle
import shlex
import zipfile

import numpy as np
import PIL.Image
import pytest
from helpers import tiny_net

from pfgmpp_fast import cli
from pfgmpp_fast.checkpoint import save_network
from pfgmpp_fast.evaluation.published import ckpt_folder, random_subset

INF = math.inf
TINY_NET = '{"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []}'
RUN = "training-runs/exp_name"
README_TRAIN = "--outdir=training-runs --name exp_name --data=datasets/cifar10-32x32.zip"
CIFAR = dict(
    batch=512,
    lr=1e-3,
    dropout=0.13,
    augment=0.12,
    network={},
    precision="auto",
    xflip=False,
    cudnn_benchmark=True,
    resume=None,
    transfer=None,
    P_mean=-1.2,
)
FFHQ = dict(batch=256, lr=2e-4, dropout=0.05, augment=0.15, network={"channel_mult": [1, 2, 2, 2]})
EDM_SAMPLER = dict(num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, solver="heun", S_churn=0.0, alpha=0.0)

# (where it is shown, command, the arguments after the script name, resolved options that must hold)
PUBLISHED = [
    (
        "README: training (arch=ddpmpp, aug_dim=128)",
        "train",
        "--outdir=training-runs --name exp_name \\\n--data=datasets/cifar10-32x32.zip --cond=0 --arch=ddpmpp \\\n"
        "--pfgmpp=1 --batch 512 \\\n--aug_dim 128",
        dict(CIFAR, run_dir=RUN, D=128.0, arch="ddpmpp", cond=False),
    ),
    (
        "README: training, resumed (arch=ncsnpp, aug_dim=2048)",
        "train",
        "--outdir=training-runs --name exp_name \\\n--data=datasets/cifar10-32x32.zip --cond=0 --arch=ncsnpp \\\n"
        "--pfgmpp=1 --batch 512 \\\n--aug_dim 2048 --resume training-runs/exp_name/training-state-000100.pt",
        dict(CIFAR, run_dir=RUN, D=2048.0, arch="ncsnpp", resume=f"{RUN}/training-state-000100.pt"),
    ),
    (
        "README table: cifar10-ncsnpp-D-128",
        "train",
        f"{README_TRAIN} --cond=0 --arch=ncsnpp --pfgmpp=1 --aug_dim=128",
        dict(CIFAR, run_dir=RUN, D=128.0, arch="ncsnpp", cond=False),
    ),
    (
        "README table: cifar10-ncsnpp-D-2048",
        "train",
        f"{README_TRAIN} --cond=0 --arch=ncsnpp --pfgmpp=1 --aug_dim=2048",
        dict(CIFAR, D=2048.0, arch="ncsnpp", cond=False),
    ),
    (
        "README table: cifar10-ncsnpp-D-2048-conditional",
        "train",
        f"{README_TRAIN} --cond=1 --arch=ncsnpp --pfgmpp=1 --aug_dim=2048",
        dict(CIFAR, D=2048.0, arch="ncsnpp", cond=True),
    ),
    (
        "README table: cifar10-ncsnpp-D-inf (EDM)",
        "train",
        f"{README_TRAIN} --cond=0 --arch=ncsnpp",
        dict(CIFAR, D=INF, arch="ncsnpp", cond=False),
    ),
    (
        "README table: ffhq-ddpm-D-128",
        "train",
        f"{README_TRAIN} --cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15 "
        "--pfgmpp=1 --aug_dim=128",
        dict(FFHQ, D=128.0, arch="ddpmpp", cond=False),
    ),
    (
        "README table: ffhq-ddpm-D-inf (EDM)",
        "train",
        f"{README_TRAIN} --cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15",
        dict(FFHQ, D=INF, arch="ddpmpp", cond=False),
    ),
    (
        "docs/train-help.txt example",
        "train",
        "--outdir=training-runs \\\n    --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp",
        dict(CIFAR, run_dir="training-runs", D=INF, arch="ddpmpp", cond=True),
    ),
    (
        "README: generate 50k samples (aug_dim=128)",
        "generate",
        "--seeds=0-49999 --outdir=./training-runs/exp_name \\\n--pfgmpp=1 --aug_dim=128",
        dict(
            EDM_SAMPLER,
            D=128.0,
            num_seeds=50000,
            batch=64,
            jobs=[{"network": f"./{RUN}/network-snapshot-000100.safetensors", "outdir": f"./{RUN}/ckpt_000100"}],
        ),
    ),
    (
        "README: generate 50k samples from pickles (aug_dim=128)",
        "generate",
        "--seeds=0-49999 --outdir=./training-runs/exp_name \\\n--pfgmpp=1 --aug_dim=128 --use_pickle=1",
        dict(
            EDM_SAMPLER,
            D=128.0,
            num_seeds=50000,
            jobs=[{"network": f"./{RUN}/training-state-000100.pkl", "outdir": f"./{RUN}/ckpt_000100"}],
        ),
    ),
    (
        "docs/generate-help.txt: 64 images",
        "generate",
        "--outdir=out --seeds=0-63 --batch=64 \\\n    --network=edm-cifar10-32x32-cond-vp.pkl",
        dict(
            EDM_SAMPLER,
            D=None,
            num_seeds=64,
            batch=64,
            jobs=[{"network": "edm-cifar10-32x32-cond-vp.pkl", "outdir": "out"}],
        ),
    ),
    (
        "docs/generate-help.txt: 1024 images on 2 GPUs",
        "generate",
        "--outdir=out --seeds=0-999 --batch=64 \\\n    --network=edm-cifar10-32x32-cond-vp.pkl",
        dict(EDM_SAMPLER, D=None, num_seeds=1000, jobs=[{"network": "edm-cifar10-32x32-cond-vp.pkl", "outdir": "out"}]),
    ),
    (
        "docs/fid-help.txt: generate 50000 images",
        "generate",
        "--outdir=fid-tmp --seeds=0-49999 --subdirs \\\n        --network=edm-cifar10-32x32-cond-vp.pkl",
        dict(EDM_SAMPLER, num_seeds=50000, jobs=[{"network": "edm-cifar10-32x32-cond-vp.pkl", "outdir": "fid-tmp"}]),
    ),
    (
        "command.sh: generate",
        "generate",
        "--outdir=fid-tmp \\\n--seeds=0-63 --subdirs  --network=training-runs/cifar_stf_1024_2/training-state-022579.pt",
        dict(
            EDM_SAMPLER,
            num_seeds=64,
            jobs=[{"network": "training-runs/cifar_stf_1024_2/training-state-022579.pt", "outdir": "fid-tmp"}],
        ),
    ),
    (
        "README: FID evaluation",
        "fid",
        "calc --images=training-runs/exp_name --ref=fid-refs/cifar10-32x32.npz --num 50000",
        dict(images=RUN, num=50000, seed=0, ref="fid-refs/cifar10-32x32.npz", ckpt_folders=[f"{RUN}/ckpt_000100"]),
    ),
    (
        "docs/fid-help.txt: calc",
        "fid",
        "calc --images=fid-tmp \\\n        --ref=fid-refs/cifar10-32x32.npz",
        dict(images="fid-tmp", num=50000, seed=0, ckpt_folders=[]),
    ),
    (
        "command.sh: fid calc",
        "fid",
        "calc --images=./training-runs/cifar_stf_1024_2/ckpt_22579 \\\n    --ref=../data/cifar10/cifar10-32x32.npz",
        dict(images="./training-runs/cifar_stf_1024_2/ckpt_22579", num=50000, ckpt_folders=[]),
    ),
    *[
        (
            f"README: {name} reference statistics",
            "fid",
            f"ref --data=datasets/{name}.zip --dest=fid-refs/{name}.npz",
            dict(data=f"datasets/{name}.zip", dest=f"fid-refs/{name}.npz", features="inception"),
        )
        for name in ("cifar10-32x32", "ffhq-64x64", "afhqv2-64x64", "imagenet-64x64")
    ],
    (
        "docs/fid-help.txt: ref",
        "fid",
        "ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz",
        dict(data="datasets/my-dataset.zip", dest="fid-refs/my-dataset.npz"),
    ),
]
# published command lines refused on purpose: (where, command, arguments, what the message says)
PUBLISHED_REFUSED = [
    (
        "README: generate with --save_images (a trajectory GIF)",
        "generate",
        "--seeds=0-49999 --outdir=./training-runs/exp_name \\\n--pfgmpp=1 --aug_dim=128 --save_images",
        "argument --save_images/--save-images: the sampling-trajectory GIF is not supported here; omit it",
    ),
]
# published options whose feature does not exist here: refused, naming the option and what to do instead
REFUSED = [
    (
        "train",
        "--precond=vp",
        "argument --precond: vp is not supported here; only the EDM preconditioning and loss "
        "exist (PFGM++ for finite D); omit --precond or give --precond=edm",
    ),
    ("train", "--precond=ve", "argument --precond: ve is not supported here"),
    (
        "train",
        "--stf=1",
        "argument --stf: stable target field (STF) training is not supported here; omit --stf (or give --stf=0)",
    ),
    ("train", "--stf", "argument --stf: stable target field (STF) training is not supported here"),
    (
        "generate",
        "--network=n.safetensors --outdir=o --disc=vp",
        "argument --disc: vp is not supported here; the "
        "time steps are EDM's (--sigma-min, --sigma-max, --rho); omit --disc or give --disc=edm",
    ),
    ("generate", "--network=n.safetensors --outdir=o --disc=ve", "argument --disc: ve is not supported here"),
    ("generate", "--network=n.safetensors --outdir=o --disc=iddpm", "argument --disc: iddpm is not supported here"),
    (
        "generate",
        "--network=n.safetensors --outdir=o --schedule=vp",
        "argument --schedule: vp is not supported here; "
        "the noise schedule is sigma(t) = t; omit --schedule or give --schedule=linear",
    ),
    ("generate", "--network=n.safetensors --outdir=o --schedule=ve", "argument --schedule: ve is not supported here"),
    (
        "generate",
        "--network=n.safetensors --outdir=o --scaling=vp",
        "argument --scaling: vp is not supported here; "
        "there is no signal scaling s(t); omit --scaling or give --scaling=none",
    ),
    (
        "generate",
        "--network=n.safetensors --outdir=o --save_images",
        "argument --save_images/--save-images: the sampling-trajectory GIF is not supported here",
    ),
    (
        "fid",
        "calc --images=fid-tmp --ref=r.npz --prune=1",
        "argument --prune: the folders of pruned networks are not supported here; omit --prune (or give --prune=0)",
    ),
    (
        "fid",
        "calc --images=fid-tmp --ref=r.npz --quant=1",
        "argument --quant: the folders of generate_quant.py are "
        "not read here; use fid sweep --kind bits (or give --quant=0)",
    ),
    (
        "fid",
        "calc --images=fid-tmp --ref=r.npz --steps=1",
        "--steps: with --images no images are generated; the "
        "published fid.py's --steps=1 (the folders of its generate_steps.py) is not supported here: use fid sweep "
        "--kind steps",
    ),
    (
        "fid",
        "calc --images=fid-tmp --ref=r.npz --alpha=1",
        "--alpha: with --images no images are generated; the "
        "published fid.py's --alpha=1 (the folders of its generate_alpha.py) is not supported here",
    ),
]


def _png(array_hw) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.asarray(array_hw, np.uint8), "L").save(buf, format="png")
    return buf.getvalue()


def _write_pngs(folder, count, seed=0):
    """``count`` distinct 8x8 grey PNGs in the published layout folder/000000/<i:06d>.png."""
    rng = np.random.RandomState(seed)
    os.makedirs(os.path.join(folder, "000000"), exist_ok=True)
    images = rng.randint(0, 256, size=(count, 8, 8)).astype(np.uint8)
    for i, im in enumerate(images):
        with open(os.path.join(folder, "000000", f"{i:06d}.png"), "wb") as f:
            f.write(_png(im))
    return images


@pytest.fixture
def published_tree(tmp_path, monkeypatch):
    """A working directory with the files the published command lines name."""
    return _published_tree(tmp_path, monkeypatch)


def _published_tree(path, monkeypatch):
    os.makedirs(path, exist_ok=True)
    monkeypatch.chdir(path)
    os.makedirs("datasets")
    for name in ("cifar10-32x32", "ffhq-64x64", "afhqv2-64x64", "imagenet-64x64", "my-dataset"):
        with zipfile.ZipFile(f"datasets/{name}.zip", "w") as z:
            for i in range(4):
                z.writestr(f"00000/img{i:08d}.png", _png(np.full((8, 8), 60 * i)))
    return path


def _run_tree():
    """training-runs/exp_name with a network snapshot (D=128), a published-style pickle and a
    ckpt_000100 image folder; training-runs/cifar_stf_1024_2 with its network and images."""
    os.makedirs(RUN)
    save_network(f"{RUN}/network-snapshot-000100.safetensors", tiny_net(D=128))
    with open(f"{RUN}/training-state-000100.pkl", "wb") as f:
        pickle.dump({"ema": None}, f)
    _write_pngs(f"{RUN}/ckpt_000100", 3)
    os.makedirs("training-runs/cifar_stf_1024_2")
    save_network("training-runs/cifar_stf_1024_2/training-state-022579.pt", tiny_net(D=128))
    _write_pngs("training-runs/cifar_stf_1024_2/ckpt_22579", 3)
    save_network("edm-cifar10-32x32-cond-vp.pkl", tiny_net(D=INF))


def _dry_run(command, arguments, capsys):
    argv = [command, *shlex.split(arguments.replace("\\\n", " ")), "--dry-run"]
    capsys.readouterr()  # what earlier commands printed
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def _with_published_meaning(command, arguments, expected, capsys) -> bool:
    """Run one published command line (dry run) in the current directory: accepted, and its
    resolved options are ``expected``?"""
    if command != "train":
        _run_tree()
    elif "--resume" in arguments:  # the state the README's --resume resume_path names
        os.makedirs(RUN)
        open(f"{RUN}/training-state-000100.pt", "wb").close()
    code, resolved, err = _dry_run(command, arguments, capsys)
    return code == 0 and {k: resolved[k] for k in expected} == expected


@pytest.mark.parametrize("where,command,arguments,expected", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_command_line_is_accepted_with_its_meaning(
    published_tree, capsys, where, command, arguments, expected
):
    assert _with_published_meaning(command, arguments, expected, capsys), where


def test_published_command_lines_count(tmp_path, monkeypatch, capsys):
    """k/N over every published command line (the accepted and the refused-on-purpose ones),
    each in a fresh directory."""
    lines = [(c, a, e) for _, c, a, e in PUBLISHED] + [(c, a, {}) for _, c, a, _ in PUBLISHED_REFUSED]
    accepted = 0
    for i, (command, arguments, expected) in enumerate(lines):
        _published_tree(tmp_path / str(i), monkeypatch)
        accepted += _with_published_meaning(command, arguments, expected, capsys)
    print(f"published command lines accepted with the published meaning: {accepted}/{len(lines)}")
    assert (accepted, len(lines)) == (23, 24)


@pytest.mark.parametrize("where,command,arguments,message", PUBLISHED_REFUSED, ids=[p[0] for p in PUBLISHED_REFUSED])
def test_published_command_line_refused_on_purpose(published_tree, capsys, where, command, arguments, message):
    _run_tree()
    code, _, err = _dry_run(command, arguments, capsys)
    assert code == 2 and message in err and len([ln for ln in err.splitlines() if "error" in ln]) == 1, err


@pytest.mark.parametrize("command,arguments,message", REFUSED, ids=[f"{c} {a}" for c, a, _ in REFUSED])
def test_unsupported_published_option_is_refused_naming_it(published_tree, capsys, command, arguments, message):
    code, _, err = _dry_run(command, arguments, capsys)
    assert code == 2 and message in err, err


# options that contradict each other: one message naming one of them
CONFLICTS = [
    ("train", "--pfgmpp=0 --D 64", "error: --pfgmpp=0 means D = inf (EDM diffusion), but --D 64 was given"),
    ("train", "--aug_dim 64 --D 128", "error: --aug_dim 64 and --D 128 disagree; give one of them"),
    ("train", "--fp16=1 --precision bf16", "error: --fp16=1 means --precision fp16, but --precision bf16"),
    (
        "train",
        """--cbase 64 --network '{"model_channels": 32}'""",
        "error: --cbase: gives model_channels 64, but --network",
    ),
    ("train", "--cres=1,0", "error: --cres: must be comma-separated integers >= 1"),
    (
        "train",
        "--transfer datasets/ffhq-64x64.zip --resume datasets/ffhq-64x64.zip",
        "error: --transfer: cannot be given with --resume STATE",
    ),
    ("train", "--cond=maybe", "argument --cond: must be a boolean (1/0, true/false, yes/no, on/off), got 'maybe'"),
    ("generate", "--network=n.safetensors --outdir=o --pfgmpp=0 --D 64", "error: --pfgmpp=0 means D = inf"),
    ("generate", "--network=n.safetensors --outdir=o --aug_dim=1x", "argument --aug_dim/--aug-dim: D must be"),
    ("generate", "--outdir=o --npz=x.npz --use_pickle=1", "error: --network: is required"),
]


@pytest.mark.parametrize("command,arguments,message", CONFLICTS, ids=[f"{c} {a}" for c, a, _ in CONFLICTS])
def test_contradicting_options_name_one_of_them(published_tree, capsys, command, arguments, message):
    code, _, err = _dry_run(command, f"--data=digits {arguments}" if command == "train" else arguments, capsys)
    assert code == 2 and message in err, err


# ----------------------------------------------------------------------------------------
# Every option of the published train.py / generate.py / fid.py, one by one

TRAIN_OPTIONS = [
    ("--cond=true", dict(cond=True)),
    ("--cond=False", dict(cond=False)),
    ("--cond 1", dict(cond=True)),
    ("--cond", dict(cond=True)),
    ("--xflip=1", dict(xflip=True)),
    ("--xflip=0", dict(xflip=False)),
    ("--pfgmpp=1", dict(D=128.0)),
    ("--pfgmpp=0 --aug_dim=128", dict(D=INF)),
    ("--pfgmpp=yes --aug_dim 64", dict(D=64.0)),
    ("--aug_dim=2048", dict(D=2048.0)),
    ("--D 64", dict(D=64.0)),
    ("--D inf --pfgmpp=0", dict(D=INF)),
    ("--arch=adm", dict(arch="adm")),
    ("--precond=edm", {}),
    ("--stf=0", {}),
    ("--rbatch=1024", {}),
    ("--duration=0.5", dict(duration_mimg=0.5)),
    ("--batch=64", dict(batch=64)),
    ("--batch-gpu=16", dict(batch_gpu=16)),
    ("--cbase=64", dict(network={"model_channels": 64})),
    ("--nblock=2", dict(network={"num_blocks": 2})),
    ("--cres=1,2,2,2", dict(network={"channel_mult": [1, 2, 2, 2]})),
    ("--cres=1-3", dict(network={"channel_mult": [1, 2, 3]})),  # the published parse_int_list's ranges
    ("--lr=2e-4", dict(lr=2e-4)),
    ("--ema=0.05", dict(ema_halflife_kimg=50.0)),
    ("--dropout=0.05", dict(dropout=0.05)),
    ("--augment=0", dict(augment=0.0)),
    ("--lsun=1", dict(P_mean=-1.2 + math.log(380 / 80))),
    ("--lsun=0", dict(P_mean=-1.2)),
    ("--fp16=1", dict(precision="fp16")),
    ("--fp16=0", dict(precision="fp32")),
    ("--ls=4", dict(loss_scaling=4.0)),
    ("--bench=0", dict(cudnn_benchmark=False)),
    ("--bench=1", dict(cudnn_benchmark=True)),
    ("--cache=0", {}),
    ("--cache=1", {}),
    ("--workers=4", {}),
    ("--desc=x --nosubdir", dict(run_dir="training-runs")),
    ("--tick=10", dict(tick_kimg=10.0)),
    ("--snap=5", dict(snap_ticks=5)),
    ("--dump=50", dict(dump_ticks=50)),
    ("--seed=7", dict(seed=7)),
    ("--transfer=datasets/ffhq-64x64.zip", dict(transfer="datasets/ffhq-64x64.zip", ema_rampup_ratio=None)),
    ("--name=exp_name", dict(run_dir=RUN)),
    ("-n", {}),
]


@pytest.mark.parametrize("options,expected", TRAIN_OPTIONS, ids=[o for o, _ in TRAIN_OPTIONS])
def test_every_published_train_option(published_tree, capsys, options, expected):
    code, resolved, err = _dry_run(
        "train", f"--outdir=training-runs --data=datasets/cifar10-32x32.zip {options}", capsys
    )
    assert code == 0, err
    assert {k: resolved[k] for k in expected} == expected


GENERATE_OPTIONS = [
    ("--sigma_min=0.01 --sigma_max=40 --rho=5 --steps=9", dict(sigma_min=0.01, sigma_max=40.0, rho=5.0, num_steps=9)),
    ("--S_churn=40 --S_min=0.05 --S_max=50 --S_noise=1.003", dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)),
    ("--solver=euler", dict(solver="euler")),
    ("--disc=edm --schedule=linear --scaling=none", dict(solver="heun")),
    ("--class=3 --batch=16", dict(class_idx=3, batch=16)),
    ("--pfgmpp=1 --aug_dim=128", dict(D=128.0)),
    ("--pfgmpp=0", dict(D=INF)),
    ("--aug_dim=128", dict(D=128.0)),
    ("--subdirs --resume=5", {}),
]


@pytest.mark.parametrize("options,expected", GENERATE_OPTIONS, ids=[o for o, _ in GENERATE_OPTIONS])
def test_every_published_generate_option(published_tree, capsys, options, expected):
    code, resolved, err = _dry_run("generate", f"--network=n.safetensors --outdir=out {options}", capsys)
    assert code == 0, err
    assert {k: resolved[k] for k in expected} == expected


def test_generate_checkpoint_range_of_a_run_directory(published_tree, capsys):
    os.makedirs("run")
    for kimg in (100, 200, 300):
        save_network(f"run/network-snapshot-{kimg:06d}.safetensors", tiny_net(D=128))
    jobs = lambda args: [j["outdir"] for j in _dry_run("generate", f"--outdir=run {args}", capsys)[1]["jobs"]]
    assert jobs("--ckpt=150 --end_ckpt=250") == ["run/ckpt_000200"]
    assert jobs("--ckpt=150 --end_ckpt=250 --edm=1") == [f"run/ckpt_{k:06d}" for k in (100, 200, 300)]
    assert jobs("--seeds=50000-99999 --ckpt=300") == ["run/ckpt_2_000300"]  # the published second seed set
    assert jobs("--seeds=100000-149999 --ckpt=300") == ["run/ckpt_3_000300"]
    assert ckpt_folder("run", 7, [1, 49999]) == "run/ckpt_000007"
    code, _, err = _dry_run("generate", "--outdir=empty-run", capsys)
    assert code == 2 and "--network: is required" in err


def test_fid_calc_published_options(published_tree, capsys):
    _run_tree()
    _write_pngs(f"{RUN}/ckpt_2_000100", 2)
    _write_pngs(f"{RUN}/ckpt_000300", 2)
    code, r, err = _dry_run("fid", f"calc --images={RUN} --ref=r.npz --num 3 --seed 5 --batch 16", capsys)
    assert code == 0 and (r["num"], r["seed"], r["batch"]) == (3, 5, 16), err
    assert r["ckpt_folders"] == [f"{RUN}/ckpt_000100", f"{RUN}/ckpt_000300"]
    assert _dry_run("fid", f"calc --images={RUN} --ref=r.npz --ckpt=200", capsys)[1]["ckpt_folders"] == [
        f"{RUN}/ckpt_000300"
    ]
    assert _dry_run("fid", f"calc --images={RUN} --ref=r.npz --end_ckpt=200", capsys)[1]["ckpt_folders"] == [
        f"{RUN}/ckpt_000100"
    ]
    assert _dry_run("fid", f"calc --images={RUN} --ref=r.npz --gen_seed=2", capsys)[1]["ckpt_folders"] == [
        f"{RUN}/ckpt_2_000100"
    ]
    for accepted in ("--prune=0", "--quant=0"):
        assert _dry_run("fid", f"calc --images={RUN} --ref=r.npz {accepted}", capsys)[0] == 0
    code, _, err = _dry_run("fid", f"calc --images={RUN} --ref=r.npz --dest=s.npz", capsys)
    assert code == 2 and "--dest:" in err and "use --outdir" in err
    # --seed is the subset seed, not an abbreviation of --seeds
    assert _dry_run("fid", "calc --network=n.safetensors --ref=r.npz --seed 9", capsys)[1]["seeds"] is None


# ----------------------------------------------------------------------------------------
# The published flows, run for real


def _fast(*extra):
    return ["--steps", "2", "--batch", "4", "--device", "cpu", "--backend", "reference", "--no-progress", *extra]


def test_generate_and_fid_over_a_run_directory_as_published(published_tree, capsys, digits_cache):
    os.makedirs("run")
    for kimg in (100, 200):
        save_network(f"run/network-snapshot-{kimg:06d}.safetensors", tiny_net(D=128, seed=kimg))
    # README: generate.py --seeds=... --outdir=<run> --pfgmpp=1 --aug_dim=...
    assert cli.main(["generate", "--seeds=0-5", "--outdir=run", "--pfgmpp=1", "--aug_dim=128", *_fast()]) == 0
    for kimg in (100, 200):
        assert (
            cli.main(
                [
                    "generate",
                    f"--network=run/network-snapshot-{kimg:06d}.safetensors",
                    "--seeds=0-5",
                    f"--outdir=direct{kimg}",
                    *_fast(),
                ]
            )
            == 0
        )
        for seed in range(6):
            published = PIL.Image.open(f"run/ckpt_{kimg:06d}/000000/{seed:06d}.png")
            assert np.array_equal(
                np.asarray(published), np.asarray(PIL.Image.open(f"direct{kimg}/000000/{seed:06d}.png"))
            )
    capsys.readouterr()
    assert cli.main(["generate", "--seeds=0-5", "--outdir=run", *_fast()]) == 0  # done: skipped, as published
    assert capsys.readouterr().out.count("skipped") == 2
    assert cli.main(["generate", "--seeds=6-7", "--outdir=run", "--pfgmpp=0", *_fast()]) == 2
    assert "error: --pfgmpp:" in capsys.readouterr().err
    # README: fid.py calc --images=<run> --ref=... --num N: the FID of each ckpt folder
    digits = ["--features", "digits", "--digits-cache", digits_cache]
    assert cli.main(["fid", "calc", "--images=run", "--num", "6", "--outdir", "fid", "--device", "cpu", *digits]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["path"] for r in results] == ["run/ckpt_000100", "run/ckpt_000200"]
    for kimg in (100, 200):
        assert (
            cli.main(
                [
                    "fid",
                    "calc",
                    f"--images=run/ckpt_{kimg:06d}",
                    "--num",
                    "6",
                    "--dest",
                    f"d{kimg}.npz",
                    "--device",
                    "cpu",
                    *digits,
                ]
            )
            == 0
        )
        with np.load(f"fid/ckpt_{kimg:06d}/stats.npz") as a, np.load(f"d{kimg}.npz") as b:
            assert np.array_equal(a["mu"], b["mu"]) and np.array_equal(a["sigma"], b["sigma"])


def test_fid_calc_uses_the_published_random_subset(published_tree, capsys, digits_cache):
    images = _write_pngs("imgs", 12, seed=3)
    digits = ["--features", "digits", "--digits-cache", digits_cache, "--device", "cpu"]
    for seed in (0, 7):
        assert (
            cli.main(
                ["fid", "calc", "--images=imgs", "--num", "5", "--seed", str(seed), "--dest", f"s{seed}.npz", *digits]
            )
            == 0
        )
        # the published ImageFolderDataset: np.random.RandomState(seed).shuffle(arange), first num, sorted
        chosen = np.sort(np.random.RandomState(seed).permutation(12)[:5])
        assert np.array_equal(random_subset(12, 5, seed), chosen)
        np.savez("expected.npz", images=images[chosen][..., None])
        assert cli.main(["fid", "calc", "--images=expected.npz", "--num", "5", "--dest", f"e{seed}.npz", *digits]) == 0
        with np.load(f"s{seed}.npz") as a, np.load(f"e{seed}.npz") as b:
            assert np.array_equal(a["mu"], b["mu"]) and np.array_equal(a["sigma"], b["sigma"])
    with np.load("s0.npz") as a, np.load("s7.npz") as b:
        assert not np.array_equal(a["mu"], b["mu"])
    assert np.array_equal(random_subset(4, 5, 0), np.arange(4))  # not more than --num: all of them


# ----------------------------------------------------------------------------------------
# Run directories: never two runs in one


def _train(outdir, *extra, steps=2):
    return cli.main(
        [
            "train",
            "--outdir",
            str(outdir),
            "--data",
            "digits",
            "--batch",
            "16",
            "--duration",
            f"{steps * 16 / 1e6:g}",
            "--tick",
            "0.016",
            "--dump",
            "1",
            "--snap",
            "1",
            "--precision",
            "fp32",
            "--no-compile",
            "--device",
            "cpu",
            "--network",
            TINY_NET,
            "--no-progress",
            "--dropout",
            "0",
            "--lr-rampup",
            "0.032",
            *extra,
        ]
    )


def _stats(run_dir):
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_fresh_run_never_goes_beside_another_run(published_tree, capsys):
    assert _train("r") == 0
    before = _stats("r")
    assert len(before) == 2
    assert _train("r") == 2
    err = capsys.readouterr().err
    assert "error: --outdir: r already holds a training run (log.txt, network-snapshot-000000.safetensors" in err
    assert "--resume auto" in err and _stats("r") == before
    from pfgmpp_fast.training.train import run_training

    with pytest.raises(ValueError, match="already holds a training run"):
        run_training(run_dir="r", data="digits", device="cpu")
    assert _train("r", "--resume", "auto", steps=3) == 0  # continues the run: one more tick
    assert [s["Progress/tick"]["mean"] for s in _stats("r")] == [0, 1, 2]
    # an explicit state of another run may not continue into a directory that holds a run
    assert _train("other") == 0
    assert _train("other", "--resume", "r/training-state-000000.pt", steps=3) == 2
    assert "error: --resume: r/training-state-000000.pt is a state of the run in" in capsys.readouterr().err


def test_resume_auto_without_a_state_restarts_only_the_same_run(published_tree, capsys):
    def without_states():  # an attempt killed before it wrote a training state
        for name in os.listdir("r"):
            if name.startswith("training-state-"):
                os.unlink(os.path.join("r", name))

    assert _train("r") == 0
    without_states()
    rows = _stats("r")
    assert _train("r", "--resume", "auto") == 0  # starts again from tick 0: no tick twice in stats.jsonl
    assert "resume: no training state found" in capsys.readouterr().out
    assert [s["Progress/tick"]["mean"] for s in _stats("r")] == [s["Progress/tick"]["mean"] for s in rows] == [0, 1]
    without_states()
    assert _train("r", "--resume", "auto", "--lr", "0.5") == 2
    assert "holds a run with other options and no training state to resume from" in capsys.readouterr().err
    assert len(_stats("r")) == 2


def test_name_and_desc_pick_the_run_folder_as_published(published_tree, capsys):
    run_dir = lambda *a: _dry_run(
        "train", " ".join(["--outdir=runs", "--data=digits", "--batch=16", "--device=cpu", *a]), capsys
    )[1]["run_dir"]
    desc = "digits-uncond-ddpmpp-edm-gpus1-batch16-fp32-x"
    assert run_dir("--name=exp") == "runs/exp"
    assert run_dir("--desc=x") == f"runs/00000-{desc}"
    assert run_dir("--desc=x --nosubdir") == "runs"
    assert run_dir("--desc=x --name=exp") == "runs/exp"  # published: --name wins
    assert _train("runs", "--desc", "x") == 0 and os.path.isfile(f"runs/00000-{desc}/stats.jsonl")
    os.makedirs("runs/00003-other")
    assert run_dir("--desc=x") == f"runs/00004-{desc}"  # a new run: the next id
    assert run_dir("--desc=x --resume=auto") == f"runs/00000-{desc}"  # --resume auto: the newest of this desc
    assert _train("runs", "--desc", "x", "--resume", "auto", steps=3) == 0
    assert sorted(os.listdir("runs")) == [f"00000-{desc}", "00003-other"]
    assert [s["Progress/tick"]["mean"] for s in _stats(f"runs/00000-{desc}")] == [0, 1, 2]
