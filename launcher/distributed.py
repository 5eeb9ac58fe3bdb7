"""Process-group set-up for every way this job is started: plain python, torchrun, the
`deepspeed` launcher, or `srun` under SLURM.

Order of precedence: torch elastic / DeepSpeed variables (RANK, WORLD_SIZE, LOCAL_RANK), then
SLURM's (only inside an `srun` step, so a batch script that runs python directly is one
process, not a rank waiting for peers that never come), then a single process. Whatever was
found is exported back as RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT because
`deepspeed.initialize` falls back to MPI discovery (and fails) without them.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

Launcher = Literal["torchrun", "deepspeed", "slurm", "single"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    device: torch.device
    backend: Literal["gloo", "nccl"]
    launcher: Launcher

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


# --------------------------------------------------------------------------- SLURM helpers

def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...] (SLURM host lists nest ranges in brackets)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_ranges(body: str) -> list[str]:
    """'1-3,07' -> ['1', '2', '3', '07'], keeping zero padding ('01-03' -> '01', '02', '03')."""
    out = []
    for item in body.split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo)
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        else:
            out.append(item)
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Pure-Python `scontrol show hostnames`: 'gpu[01-02,05],cpu7' -> gpu01 gpu02 gpu05 cpu7."""
    hosts: list[str] = []
    for part in _split_top_level(hostlist.strip()):
        prefixes = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            prefixes = [p + literal for p in prefixes]
            if ranges:
                prefixes = [p + r for p in prefixes for r in _expand_ranges(ranges)]
        hosts.extend(prefixes)
    return hosts


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE ('2(x3),1') -> task count of node `node_id`."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if m is None:
            raise ValueError(f"cannot parse SLURM tasks per node {tasks_per_node!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts[node_id]


def resolve_host(name: str) -> str:
    """Address of a SLURM node: DNS first, then the NodeAddr that slurmctld knows.

    Real clusters resolve node names; test clusters (several slurmd on one host with fake
    names) only know the address through `scontrol show node`.
    """
    try:
        socket.getaddrinfo(name, None)
        return name
    except socket.gaierror:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", name], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"SLURM node {name!r} does not resolve and scontrol failed: {exc}") from None
    m = re.search(r"\bNodeAddr=(\S+)", out)
    if m is None:
        raise RuntimeError(f"SLURM node {name!r} does not resolve and scontrol shows no NodeAddr")
    return m.group(1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- discovery

def discover(local_rank_arg: int | None = None) -> tuple[Launcher, int, int, int, int, str, int]:
    """(launcher, rank, world, local_rank, local_world, master_addr, master_port) from the env."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher: Launcher = "deepspeed" if "LOCAL_SIZE" in env else "torchrun"
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port()
        if world > 1 and "MASTER_PORT" not in env:
            raise RuntimeError("RANK/WORLD_SIZE are set for several ranks but MASTER_PORT is not")
        return launcher, rank, world, local_rank, local_world, addr, port
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        rank = int(env["SLURM_PROCID"])
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
        local_rank = int(env.get("SLURM_LOCALID", "0"))
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE"))
        local_world = tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0"))) if per_node else 1
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        else:
            nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", ""))
            hosts = expand_hostlist(nodelist)
            addr = resolve_host(hosts[0]) if hosts else "127.0.0.1"
        if "MASTER_PORT" in env:
            port = int(env["MASTER_PORT"])
        elif "SLURM_JOB_ID" in env:
            # Same value on every rank without any communication; away from ephemeral ports.
            port = 15000 + int(env["SLURM_JOB_ID"]) % 20000
        else:
            port = 29500
        return "slurm", rank, world, local_rank, local_world, addr, port
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        warnings.warn("SLURM_NTASKS > 1 but this is not an srun step: running as one process "
                      "(start the job with srun to use every task)", stacklevel=2)
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port()
    return "single", 0, 1, 0, 1, addr, port


def omp_threads() -> int | None:
    """OMP_NUM_THREADS when it is set to a positive integer, else None."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def cpu_threads_per_rank(local_world: int) -> int:
    """Cores this rank should use: the affinity set split among the node's ranks.

    If the launcher already pinned this process to a subset of the machine (srun
    --cpus-per-task with binding), that subset is ours alone and is not divided again.
    """
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    if available < (os.cpu_count() or available):
        return max(1, available)
    return max(1, available // max(1, local_world))


_INFO: DistInfo | None = None


def setup_distributed(local_rank: int | None = None) -> DistInfo:
    """Find ranks, export the standard variables, set threads/device, init the process group.

    `local_rank` is the `--local_rank` argument the `deepspeed` launcher passes (LOCAL_RANK in
    the environment wins). Idempotent: a second call returns the first result.
    """
    global _INFO
    if _INFO is not None and dist.is_initialized():
        return _INFO
    launcher, rank, world, lrank, lworld, addr, port = discover(local_rank)
    own_port = launcher == "single" and "MASTER_PORT" not in os.environ
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(lrank),
                      LOCAL_WORLD_SIZE=str(lworld), MASTER_ADDR=addr, MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", lrank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # A thread count set by the user or the launcher (torchrun, Ray: the trial's CPUs) is
        # kept; the deepspeed launcher leaves it unset, and 2 ranks x all cores thrash.
        threads = omp_threads() or cpu_threads_per_rank(lworld)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    import deepspeed  # slow import (~2 s); only needed from here on

    # A port we picked ourselves can be taken by another process between _free_port closing
    # it and the store binding it (seen in CI beside Ray and slurmd): pick again.
    for attempt in range(5 if own_port else 1):
        if dist.is_initialized():
            break
        try:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       distributed_port=port, verbose=False)
        except dist.DistNetworkError:
            if not own_port or attempt == 4:
                raise
            port = _free_port()
            os.environ["MASTER_PORT"] = str(port)
    _INFO = DistInfo(rank=rank, world_size=world, local_rank=lrank, local_world_size=lworld,
                     master_addr=addr, master_port=port, device=device, backend=backend,
                     launcher=launcher)
    return _INFO


def is_primary() -> bool:
    """True on global rank 0 (or when no process group exists): the rank that prints and writes."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def reduce_scalars(values: dict[str, float],
                   op: Literal["mean", "sum", "max"] = "mean") -> dict[str, float]:
    """Reduce a dict of Python numbers over all ranks in one collective (every rank must call)."""
    if not values or not (dist.is_initialized() and dist.get_world_size() > 1):
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    device = _INFO.device if _INFO is not None else torch.device("cpu")
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def cleanup() -> None:
    """Destroy the process group (safe to call twice or without one)."""
    global _INFO
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INFO = None
