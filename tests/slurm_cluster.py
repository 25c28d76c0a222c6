"""A real single-node SLURM for the tests: munged, ``slurmctld -D`` and ``slurmd -D``.

Everything lives in one temporary folder: the munge key and socket, a generated ``slurm.conf``
(``SLURM_CONF`` points the clients at it), the state and spool folders and the daemons' logs.
The ports are free ones, so two clusters (two test workers, two checkouts) can run at once.
The settings are those that work in a container: processes tracked by ``/proc`` (no cgroups),
no task plugin, no job accounting, one node named by ``hostname -s`` with its CPUs and memory.

``python -m tests.slurm_cluster DIR`` starts one and prints the ``SLURM_CONF`` to export, for
trying commands by hand; Ctrl-C stops it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")
START_TIMEOUT_S = 30.0


def missing() -> str | None:
    """Why a cluster cannot start here (a program not installed, not root), or None."""
    paths = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
    search = os.pathsep.join([os.environ.get("PATH", ""), *paths])
    absent = [name for name in DAEMONS if shutil.which(name, path=search) is None]
    if absent:
        return f"not installed: {', '.join(absent)} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root (SlurmUser=root)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_line(name: str) -> str:
    """The node as ``slurmd -C`` sees it, less some memory for the system."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    words = dict(w.split("=", 1) for w in out.split() if "=" in w)
    memory = max(512, int(words["RealMemory"]) - 1024)
    return (
        f"NodeName={name} NodeAddr=127.0.0.1 CPUs={words['CPUs']} "
        f"CoresPerSocket={words['CoresPerSocket']} SocketsPerBoard={words['SocketsPerBoard']} "
        f"ThreadsPerCore={words['ThreadsPerCore']} RealMemory={memory} State=UNKNOWN"
    )


def slurm_conf(root: Path, node: str, ports: list[int], kill_wait_s: int) -> str:
    """The cluster's slurm.conf. ``cred_expire`` is also how long a requeued job waits before it
    may start again (120 s by default): short, for the requeue test."""
    cred_expire_s = 10
    return f"""\
ClusterName=pnntest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={cred_expire_s}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
KillWait={kill_wait_s}
MinJobAge=300
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
{_node_line(node)}
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """A running cluster; :meth:`env` is the environment its clients need."""

    root: Path
    conf: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def start(cls, root: Path, kill_wait_s: int = 5) -> SlurmCluster:
        why = missing()
        if why:
            raise RuntimeError(f"cannot start SLURM: {why}")
        for sub in ("munge", "state", "spool"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "munge", 0o700)
        key = root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        conf = root / "slurm.conf"
        node = socket.gethostname().split(".")[0]
        conf.write_text(slurm_conf(root, node, _free_ports(2), kill_wait_s))
        cluster = cls(root, conf)
        try:
            cluster._spawn(
                "munged",
                [
                    "munged",
                    "--foreground",
                    "--force",
                    f"--key-file={key}",
                    f"--socket={root}/munge/munge.socket",
                    f"--pid-file={root}/munge/munged.pid",
                    f"--log-file={root}/munge/munged.log",
                    f"--seed-file={root}/munge/munged.seed",
                ],
            )
            cluster._wait_for(lambda: (root / "munge" / "munge.socket").exists(), "munged")
            cluster._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
            cluster._wait_for(lambda: cluster._ok(["scontrol", "ping"], "UP"), "slurmctld")
            cluster._spawn("slurmd", ["slurmd", "-D", "-N", node, "-f", str(conf)])
            cluster._wait_for(cluster._node_idle, "slurmd")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        env = {**os.environ, **self.env()}
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)

    def stop(self) -> None:
        """Stop the daemons, then any job process they left (by the jobs' SLURM_CONF)."""
        if "slurmctld" in self.procs:
            self.run("scancel", "--full", "--user=root")
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._kill_leftover_jobs()

    def _kill_leftover_jobs(self) -> None:
        """Job processes started by this cluster's slurmd, which carry its SLURM_CONF."""
        mark = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                continue

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _spawn(self, name: str, argv: list[str]) -> None:
        env = {**os.environ, **self.env()}
        out = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 - owned by the process
        self.procs[name] = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _ok(self, argv: list[str], expect: str) -> bool:
        try:
            return expect in self.run(*argv).stdout
        except subprocess.TimeoutExpired:
            return False

    def _node_idle(self) -> bool:
        try:
            state = self.run("sinfo", "-h", "-o", "%T").stdout.strip()
        except subprocess.TimeoutExpired:
            return False
        return state == "idle"

    def _wait_for(self, ready: object, name: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():  # type: ignore[operator]
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        else:
            return
        out = (self.root / f"{name}.out").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{name} did not start:\n{out}\n{self.log(name)[-2000:]}")


if __name__ == "__main__":
    cluster = SlurmCluster.start(Path(sys.argv[1]).resolve())
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
