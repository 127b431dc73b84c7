"""A real Slurm cluster on localhost for the tests: Debian's munge, slurmctld and two slurmd daemons
(nodes node1 and node2), each in a private folder with its own ports. Installs the packages when they are
absent and this process is root; stops only the daemons it started."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ensure_installed() -> str | None:
    """None when Slurm is usable, else why it cannot be here."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode:
            return f"{' '.join(cmd)} failed: {result.stderr.strip()[-300:]}"
    return None if all(shutil.which(b) for b in BINARIES) else "Slurm binaries missing after installing"


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        # a job's ranks come from Slurm: no launcher variables of this process (an in-process test run's)
        launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        self.env = {**{k: v for k, v in os.environ.items() if k not in launcher}, "SLURM_CONF": str(self.conf)}
        self.pid_files: list[Path] = []

    def start(self) -> "LocalSlurm":
        r = self.root
        (r / "state").mkdir(parents=True)
        for node in ("node1", "node2"):
            (r / "spool" / node).mkdir(parents=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld, slurmd, node1, node2 = _free_ports(4)
        self.conf.write_text(f"""\
ClusterName=skillnettest
SlurmctldHost=localhost
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge.sock
CryptoType=crypto/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node1} CPUs=1 RealMemory=4000
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node2} CPUs=1 RealMemory=4000
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
""")
        self._run(["munged", f"--key-file={key}", f"--socket={r}/munge.sock", f"--pid-file={r}/munged.pid",
                   f"--log-file={r}/munged.log", f"--seed-file={r}/munge.seed", "--force"], r / "munged.pid")
        self._run(["slurmctld", "-c", "-f", str(self.conf)], r / "slurmctld.pid")
        for node in ("node1", "node2"):
            self._run(["slurmd", "-N", node, "-f", str(self.conf)], r / f"slurmd-{node}.pid")
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.cmd("sinfo", "-h", "-o", "%T %D").stdout.split()
            if out[:2] == ["idle", "2"]:
                return self
            time.sleep(0.5)
        raise RuntimeError("the Slurm nodes did not come up: " + (r / "slurmctld.log").read_text()[-1500:])

    def _run(self, cmd: list[str], pid_file: Path) -> None:
        subprocess.run(cmd, check=True, env=self.env, capture_output=True)
        self.pid_files.append(pid_file)

    def cmd(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key=value pairs ({} once the job is gone)."""
        out = self.cmd("scontrol", "show", "job", job_id).stdout
        return dict(p.split("=", 1) for p in out.split() if "=" in p)

    def stop(self) -> None:
        """Kill every job still there (a failed test's job would train on after its daemons are gone: job
        steps outlive slurmd), then the daemons."""
        jobs = self.cmd("squeue", "--noheader", "--format=%i").stdout.split()
        if jobs:
            self.cmd("scancel", "--full", "--signal=KILL", *jobs)
            deadline = time.monotonic() + 60
            while self.cmd("squeue", "--noheader", "--format=%i").stdout.split() and time.monotonic() < deadline:
                time.sleep(0.5)
        for pid_file in reversed(self.pid_files):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
