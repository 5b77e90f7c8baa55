"""One distributed and device setup for every command (after EDM's torch_utils/distributed.py).

One process, or one process per device under ``torchrun`` (WORLD_SIZE > 1): gloo on the
CPU, NCCL on CUDA. Everything that needs a rank, a world size, a barrier or this rank's
device asks this module; ``init_process_group`` is called here and nowhere else.

Elastic restarts (``torchrun --max-restarts``): by default the torchrun agent keeps one
TCP store for all restart attempts, so the keys in which the ranks of a killed attempt
published their addresses are still there when the restarted ranks connect; a rank that
reads such a stale address before its peer overwrites it fails with ``Gloo
connectFullMesh failed ... Connection refused`` (NCCL reads its unique id from the same
store). :func:`init` therefore joins the group in a key namespace that no earlier attempt
used (named by a nonce of this attempt's rank 0, agreed through the store), with bounded,
logged retries and a timeout per try (``PFGMPP_FAST_DIST_INIT_TRIES``, default 3;
``PFGMPP_FAST_DIST_INIT_TIMEOUT`` seconds, default 300).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import uuid
from typing import Any, Callable, Optional

import torch

__all__ = [
    "pick_device",
    "needs_pinning",
    "to_device",
    "set_cpu_threads",
    "init",
    "close",
    "get_rank",
    "get_world_size",
    "is_enabled",
    "barrier",
    "all_gather",
    "broadcast_from_rank_0",
    "rank_0_value",
    "comm_device",
    "ddp",
    "elastic_info",
    "join_group",
]

INIT_TRIES_ENV = "PFGMPP_FAST_DIST_INIT_TRIES"
INIT_TIMEOUT_ENV = "PFGMPP_FAST_DIST_INIT_TIMEOUT"
_group_store = None  # the store of the group join_group made; None when there is none
LEAVE_TIMEOUT_S = 60.0
_LEFT_KEY = "pfgmpp_fast/left"  # how many ranks have left the group (close)
_PASSED_KEY = "pfgmpp_fast/passed-final-barrier"  # how many ranks have returned from close's barrier


def pick_device(name: Optional[str] = "auto") -> torch.device:
    """'auto' (CUDA of this rank's LOCAL_RANK if available, else the CPU), 'cpu', 'cuda',
    'cuda:1', ...; a CUDA device that does not exist is a ValueError naming it."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name in (None, "", "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was requested but CUDA is not available (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def needs_pinning(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` is on the host and bound for an accelerator (then staged in pinned memory)."""
    return t.device.type == "cpu" and device.type != "cpu"


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device`` without a pageable host-to-device copy (pinned staging): the host
    does not wait for the device."""
    device = torch.device(device)
    if needs_pinning(t, device):
        t = t.pin_memory()
    return t.to(device, non_blocking=device.type != "cpu")  # a non_blocking copy to the host may not have landed


def set_cpu_threads(device, threads: int) -> None:
    """torch's intra-op threads for CPU runs; 0 = torch's default. One thread avoids OpenMP
    oversubscription, which slows a 2-thread run 10–20× when other processes share the cores."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an int >= 0 (0 = torch's default), got {threads!r}")
    if torch.device(device).type == "cpu" and threads > 0:
        torch.set_num_threads(threads)


def init(device: Optional[str] = "auto") -> torch.device:
    """Pick this rank's device and, under torchrun, join the process group (idempotent).
    Returns the device."""
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before NCCL starts: it uses the current device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        _join_group(dev, world)
    return dev


def elastic_info() -> Optional[str]:
    """'torchelastic run ID, restart N' when started by torchrun's elastic agent, else None."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    return f"torchelastic run {run_id}, restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"environment variable {name} must be an int >= 1, got {text!r}")
    return value


def _warn(msg: str) -> None:
    print(f"pfgmpp_fast.distributed: {msg}", file=sys.stderr, flush=True)


def join_group(
    store,
    rank: int,
    world: int,
    device: torch.device = torch.device("cpu"),
    setup_timeout: datetime.timedelta = datetime.timedelta(seconds=300),
) -> None:
    """Join the default process group on ``store`` (gloo on the CPU, NCCL on CUDA) and wait
    until every rank is connected; :func:`close` leaves it. ``init`` calls this under
    torchrun; tests call it with a store of their own."""
    global _group_store
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1 (the number of ranks), got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}) for world={world}, got {rank!r}")
    if torch.distributed.is_initialized():
        raise RuntimeError("join_group: this process is already in a process group (call close() first)")
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world,
        timeout=setup_timeout,
        device_id=device if device.type == "cuda" else None,
    )
    _group_store = store
    torch.distributed.barrier()  # every rank is connected
    _set_timeout(
        torch.distributed.constants.default_pg_nccl_timeout
        if backend == "nccl"
        else torch.distributed.constants.default_pg_timeout
    )


def _join_group(dev: torch.device, world: int) -> None:
    """init_process_group in a fresh key namespace, retried (with backoff) when a try fails."""
    global _group_store
    rank = int(os.environ.get("RANK", "-1"))
    if not 0 <= rank < world:
        raise ValueError(
            f"environment variable RANK must be in [0, {world}) when WORLD_SIZE={world}, "
            f"got {os.environ.get('RANK')!r} (launch with torchrun)"
        )
    tries, per_try = _env_int(INIT_TRIES_ENV, 3), datetime.timedelta(seconds=_env_int(INIT_TIMEOUT_ENV, 300))
    where = f" ({elastic_info()})" if elastic_info() else ""
    base = None
    for attempt in range(1, tries + 1):
        try:
            if base is None:  # the agent's store, or one that rank 0 serves (kept across tries)
                base = next(torch.distributed.rendezvous("env://", rank=rank, world_size=world, timeout=per_try))[0]
            join_group(_fresh_namespace(base, rank, world, per_try), rank, world, dev, per_try)
            if attempt > 1:
                _warn(f"rank {rank}: joined the process group on try {attempt}/{tries}{where}")
            return
        except Exception as exc:  # noqa: BLE001 — any failure of a try is retried, the last one raised
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()  # a half-made group
            _group_store = None
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if attempt == tries:
                raise RuntimeError(
                    f"rank {rank}: could not join the process group of {world} ranks in {tries} "
                    f"tries of {per_try.total_seconds():g} s{where}: {reason}"
                ) from exc
            delay = min(2.0**attempt, 30.0)
            _warn(
                f"rank {rank}: process-group setup failed (try {attempt}/{tries}{where}): {reason}; "
                f"retrying in {delay:g} s"
            )
            time.sleep(delay)


def _fresh_namespace(store, rank: int, world: int, timeout: datetime.timedelta):
    """A PrefixStore over ``store`` that no earlier attempt wrote to. Rank 0 posts a new
    nonce; every other rank acknowledges the nonce it reads together with a nonce of its
    own, and starts once rank 0's 'go' lists its own nonce (so a stale leader key or a
    stale 'go' of a killed attempt is never taken for the current one)."""
    me, deadline = uuid.uuid4().hex, time.monotonic() + timeout.total_seconds()
    leader_key, go_key, ack_key = "pfgmpp_fast/leader", "pfgmpp_fast/go", "pfgmpp_fast/ack/{}"
    if rank == 0:
        store.set(leader_key, me)
        followers = {}
        while len(followers) < world - 1:
            for r in range(1, world):
                if r not in followers and store.check([ack_key.format(r)]):
                    leader, _, nonce = store.get(ack_key.format(r)).decode().partition(" ")
                    if leader == me:
                        followers[r] = nonce
            _wait_a_little(deadline, len(followers) < world - 1, "ranks to acknowledge")
        store.set(go_key, " ".join([me, *followers.values()]))
        leader = me
    else:
        while True:
            leader = store.get(leader_key).decode()
            store.set(ack_key.format(rank), f"{leader} {me}")
            go = store.get(go_key).decode().split() if store.check([go_key]) else []
            if me in go[1:]:
                leader = go[0]
                break
            _wait_a_little(deadline, True, "rank 0 to start the group")
    return torch.distributed.PrefixStore(f"pfgmpp_fast/pg/{leader}/", store)


def _wait_a_little(deadline: float, waiting: bool, what: str) -> None:
    if not waiting:
        return
    if time.monotonic() > deadline:
        raise TimeoutError(f"timed out waiting for {what}")
    time.sleep(0.05)


def _set_timeout(timeout: datetime.timedelta) -> None:
    """Back to torch's collective timeout after the setup's own (older torch: _set_pg_timeout)."""
    setter = getattr(torch.distributed, "set_timeout", None)
    if setter is None:
        from torch.distributed.distributed_c10d import _set_pg_timeout as setter
    setter(timeout)


def ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel without syncing buffers in forward (they are identical on all
    ranks by construction), in the API of the installed torch (``forward_sync_buffers``
    replaces the deprecated ``broadcast_buffers`` in torch 2.13)."""
    import inspect

    DDP = torch.nn.parallel.DistributedDataParallel
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP).parameters
        else {"broadcast_buffers": False}
    )
    return DDP(module, device_ids=[device] if device.type == "cuda" else None, **no_sync)


def close(failed: bool = False) -> None:
    """Leave the process group that :func:`join_group` made (no-op without one).

    After success (``failed`` False) every rank first waits at a barrier, so that no
    collective is in flight anywhere, and then on the store until every rank has returned
    from it, so that no rank tears down its connections while a peer still waits inside a
    collective. (A rank whose collectives did not match its peers' passed this barrier on a
    peer's earlier one and left while that peer hung here: see rank_0_value.)
    Gloo ranks then leave one after another, the highest
    rank first and rank 0 (which may serve the store) last, because a gloo rank that tears
    down its connections while a peer closes the other ends can abort the process
    ('terminate called without an active exception', seen in CI on torch 2.14). NCCL ranks
    leave together, as NCCL's communicator teardown requires. After a failure the peers may
    be anywhere, so the rank leaves at once."""
    global _group_store
    store = _group_store
    if store is None or not torch.distributed.is_initialized():
        _group_store = None
        return
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    in_turn = not failed and world > 1 and torch.distributed.get_backend() == "gloo"
    try:
        if not failed:
            torch.distributed.barrier()
        deadline = time.monotonic() + LEAVE_TIMEOUT_S  # a peer that died leaving is not waited for
        if not failed:
            store.add(_PASSED_KEY, 1)
            while store.add(_PASSED_KEY, 0) < world and time.monotonic() < deadline:
                time.sleep(0.01)
        while in_turn and store.add(_LEFT_KEY, 0) < world - 1 - rank and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        _group_store = None
        torch.distributed.destroy_process_group()
    if in_turn:
        store.add(_LEFT_KEY, 1)


def is_enabled() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def get_rank() -> int:
    return torch.distributed.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if is_enabled() else 1


def barrier() -> None:
    if is_enabled():
        torch.distributed.barrier()


def comm_device() -> torch.device:
    """Where the group's collectives run: the current GPU for NCCL, the CPU for gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(t: torch.Tensor) -> list:
    """Every rank's `t` (the same shape and dtype on every rank), in rank order, on `t`'s
    device; [t] without a process group. NCCL gathers on the GPU, gloo on the CPU."""
    if not is_enabled():
        return [t]
    comm = comm_device()
    parts = [torch.empty_like(t, device=comm) for _ in range(get_world_size())]
    torch.distributed.all_gather(parts, t.to(comm).contiguous())
    return [p.to(t.device) for p in parts]


def broadcast_from_rank_0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's `t` on every rank (the same shape and dtype on every rank), on `t`'s device;
    `t` itself without a process group."""
    if not is_enabled():
        return t
    out = t.to(comm_device()).contiguous()
    torch.distributed.broadcast(out, src=0)
    return out.to(t.device)


def rank_0_value(compute: Callable[[], Any]) -> Any:
    """``compute()`` evaluated on rank 0 alone, its value on every rank (two broadcasts). For
    what every rank must see alike although it changes while they work (the files that a
    faster rank, or another job, is writing), so that their collectives stay matched. The
    value travels as JSON (lists, dicts, strings, numbers, bools), never as a pickle: nothing
    received runs code; every rank, rank 0 and a lone process included, gets it back from
    JSON (tuples as lists), so a value reads the same at any world size. An exception on
    rank 0 is raised there and, as a RuntimeError naming it, on every other rank."""
    if get_rank() != 0:
        size = int(broadcast_from_rank_0(torch.zeros(1, dtype=torch.int64)))
        got = json.loads(broadcast_from_rank_0(torch.zeros(size, dtype=torch.uint8)).numpy().tobytes())
        if got["error"] is not None:
            raise RuntimeError(f"rank 0 failed: {got['error']}")
        return got["value"]
    try:
        data, error = json.dumps({"value": compute(), "error": None}), None
    except Exception as exc:  # noqa: BLE001 — every rank must hear of it, not wait forever
        data, error = json.dumps({"value": None, "error": repr(exc)}), exc
    if is_enabled():
        payload = torch.frombuffer(bytearray(data.encode()), dtype=torch.uint8)
        broadcast_from_rank_0(torch.tensor([payload.numel()], dtype=torch.int64))
        broadcast_from_rank_0(payload)
    if error is not None:
        raise error
    return json.loads(data)["value"]
