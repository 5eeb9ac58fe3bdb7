"""A throw-away SLURM cluster on 127.0.0.1 for the tests: munged, slurmctld and one or more
slurmd (`slurmd -N nodeX`, distinct ports), every file under one temp folder.

    with SlurmCluster(nodes=2) as cluster:
        job = cluster.sbatch("slurm/cifar10.sh", "--nodes=1")
        cluster.wait_for(job, {"COMPLETED"})

Settings are the ones that work without cgroups or systemd (docs/STACK.md, SLURM).
Every daemon runs in the foreground as our child, so it is stopped by its own PID. Jobs are
cancelled first; whatever is left of them (slurmstepd daemonizes) is found as the slurmstepd
processes carrying our unique SLURM_CONF path, plus their descendants, and killed by PID.
`stop()` is idempotent and registered with atexit: an interrupted session leaves nothing.

    python tests/slurm_cluster.py [NODES]    starts a cluster and waits (Ctrl-C stops it)
prints the `export SLURM_CONF=...` line to use it from another shell.

    python tests/slurm_cluster.py digest-train ARGS...
is `python -m launcher.train ARGS...` that also prints, on every rank, a SHA-256 of the
rank's model weights after the last fine-tune step (before the final report loads the best
epoch); the multi-node test uses it as PYTHON to prove the ranks ended with identical weights.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
REPO = Path(__file__).resolve().parents[1]


def slurm_missing() -> str | None:
    """Why a cluster cannot start here (a skip reason), or None."""
    for name in DAEMONS + ("sbatch", "scontrol", "squeue", "scancel", "srun"):
        if shutil.which(name) is None:
            return f"{name} not found: apt-get install -y slurm-wlm munge (install.sh --test does)"
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key missing (created by the munge package)"
    if os.geteuid() != 0:
        return "the test cluster runs slurmd as root (SlurmdUser=root); run the tests as root"
    return None


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _hardware() -> tuple[int, int]:
    """(CPUs, RealMemory MB) as `slurmd -C` reports them."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    cpus = int(re.search(r"\bCPUs=(\d+)", out).group(1))
    memory = int(re.search(r"\bRealMemory=(\d+)", out).group(1))
    return cpus, memory


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """munged + slurmctld + `nodes` slurmd named node1..nodeN, one partition `debug`.

    The host's CPUs are split between the nodes (at least 1 each; a node declaring fewer
    CPUs than the hardware has is accepted) and memory is not a consumable (CR_Core).
    """

    def __init__(self, nodes: int = 2, root: str | os.PathLike | None = None):
        self.node_names = [f"node{i + 1}" for i in range(nodes)]
        # Not under pytest's 0700 tmp dirs: munged runs as the munge user and must reach its socket.
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="spikeprune-slurm-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}
        self._stopped = False
        # In-process tests before us may have exported a rank and held MASTER_PORT: jobs must
        # start from a clean distributed environment, as a user's login shell does.
        leaked = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
        self.env = {**{k: v for k, v in os.environ.items() if k not in leaked}, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------ set-up

    def write_conf(self) -> None:
        cpus, memory = _hardware()
        per_node_cpus = max(1, cpus // len(self.node_names))
        per_node_mem = max(256, memory // (2 * len(self.node_names)))
        ctld_port, *node_ports = _free_ports(1 + len(self.node_names))
        r = self.root
        for sub in ("state", "log", *(f"spool/{n}" for n in self.node_names)):
            (r / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=spiketest",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=5",  # SIGTERM -> SIGKILL on cancel; keeps tear-down quick
            "MinJobAge=600",  # finished jobs stay visible to `scontrol show job`
            "InactiveLimit=0",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for name, port in zip(self.node_names, node_ports):
            lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={per_node_cpus} RealMemory={per_node_mem} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, key: str, argv: list[str], **kwargs) -> None:
        log = open(self.log_dir / f"{key}.stdout", "ab")
        try:
            self._procs[key] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, **kwargs)
        finally:
            log.close()

    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        d = self.munge_socket.parent
        d.mkdir(exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
        d.chmod(0o755)
        self._spawn("munged", ["munged", "-F", f"--socket={self.munge_socket}", f"--pid-file={d}/munged.pid",
                               f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
                    user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        self._wait(lambda: self.munge_socket.exists(), 15, "munged socket")

    def start(self, timeout: float = 60) -> "SlurmCluster":
        reason = slurm_missing()
        if reason:
            raise SlurmError(reason)
        atexit.register(self.stop)
        try:
            self.write_conf()
            self._start_munged()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout, "slurmctld")
            for name in self.node_names:
                self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
            self._wait(self._nodes_idle, timeout, "nodes idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.node_names)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for key, p in self._procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{key} exited with {p.returncode} while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.25)
        raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")

    # ------------------------------------------------------------------ use

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        out = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} -> {out.returncode}: {out.stderr.strip()}")
        return out

    def sbatch(self, script: str | os.PathLike, *options: str, env: dict | None = None,
               cwd: str | os.PathLike | None = None) -> int:
        """Submit `script` with sbatch `options`; `env` is added to the job's environment."""
        argv = ["sbatch", "--parsable", *options, str(script)]
        out = subprocess.run(argv, env={**self.env, **(env or {})}, capture_output=True, text=True,
                             timeout=60, cwd=cwd)
        if out.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} -> {out.returncode}: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, StdOut, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, job_id: int, states: set[str], timeout: float, poll: float = 1.0) -> dict[str, str]:
        """Wait until the job's state is one of `states`; a final state outside them is an error."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in states:
                return info
            if state in final:
                raise SlurmError(f"job {job_id} ended {state} (waiting for {sorted(states)}): {info}")
            time.sleep(poll)
        raise SlurmError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s "
                         f"(waiting for {sorted(states)})")

    def logs(self, tail: int = 30) -> str:
        parts = []
        for f in sorted(self.log_dir.glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            if lines:
                parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------ tear-down

    def _job_pids(self) -> list[int]:
        """What is left of our jobs: every slurmstepd whose environment holds our SLURM_CONF
        path (inherited from our slurmd; no one else's can hold it), and all its descendants
        (batch script, srun, tasks)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        children: dict[int, list[int]] = {}
        roots = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(pid)
                if (entry / "cmdline").read_bytes().startswith(b"slurmstepd") and \
                        marker in (entry / "environ").read_bytes().split(b"\0"):
                    roots.append(pid)
            except (OSError, IndexError, ValueError):
                continue
        found, todo = [], list(roots)
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def _cancel_jobs(self) -> None:
        if "slurmctld" not in self._procs or self._procs["slurmctld"].poll() is not None:
            return
        ids = self.run("squeue", "-h", "-o", "%i", check=False, timeout=15).stdout.split()
        if ids:
            self.run("scancel", *ids, check=False, timeout=15)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False, timeout=15).stdout.strip():
                time.sleep(0.5)

    def stop(self) -> None:
        """Cancel jobs, then stop slurmd(s), slurmctld and munged by PID (safe to call twice)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._cancel_jobs()
        except (OSError, subprocess.SubprocessError) as exc:  # the daemons must go regardless
            print(f"slurm_cluster: cancelling jobs failed ({exc}); killing what is left", flush=True)
        deadline = time.monotonic() + 5  # slurmstepd needs a moment to clean up after a job
        while self._job_pids() and time.monotonic() < deadline:
            time.sleep(0.25)
        for pid in self._job_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        order = [k for k in self._procs if k.startswith("slurmd-")] + ["slurmctld", "munged"]
        for key in order:
            p = self._procs.get(key)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def train_with_weight_digest(argv: list[str]) -> int:
    """launcher.train's main, printing `weights_sha256 rank=R master=ADDR:PORT HEX` on each rank."""
    import sys

    sys.path.insert(0, str(REPO))
    import hashlib

    import torch

    import launcher.train as train

    final_report = train.final_report

    def digest_then_report(ctx):
        h = hashlib.sha256()
        for name, t in sorted(ctx.net.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        print(f"weights_sha256 rank={os.environ['RANK']} master={os.environ['MASTER_ADDR']}:"
              f"{os.environ['MASTER_PORT']} {h.hexdigest()}", flush=True)
        return final_report(ctx)

    train.final_report = digest_then_report
    return train.main(argv)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["digest-train"]:
        sys.exit(train_with_weight_digest(sys.argv[2:]))
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill PID` tears the cluster down too
    with SlurmCluster(nodes=int(sys.argv[1]) if len(sys.argv) > 1 else 2) as cluster:
        print(f"export SLURM_CONF={cluster.conf}\n(logs in {cluster.log_dir}; Ctrl-C or kill stops it)",
              flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
