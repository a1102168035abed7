"""A real one-node SLURM for the tests: munged, slurmctld and slurmd from the OS packages
(Debian's ``slurm-wlm`` and ``munge``), every file of theirs in a temporary folder (no
system-wide configuration is read or written), stopped after the tests.

Nothing is installed here. Where the programs are missing or the daemons cannot start
(slurmd must run as root), the tests that use the ``slurm_cluster`` fixture are skipped
with the reason; with ``MIRAGE_TEST_SLURM=required`` (set by ``.ci/run`` once it has
installed SLURM) they fail instead, so that CI cannot pass by skipping them.

The cluster: one partition, one node (this machine, reached as 127.0.0.1) offering at
least 4 CPUs (``config_overrides``: the tasks mostly sleep or train tiny models), no
cgroups, no accounting (like many small clusters: ``sacct`` fails), ``JobRequeue=0`` (a
job is requeued only if it asks, as with ``--runner-slurm-requeue``) and
``MinJobAge=10`` (squeue forgets finished jobs after about 10 s instead of 300 s).
docs/runner.md, "Try the cluster path on your laptop", starts the same cluster by hand.
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import process_gone

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel",
            "sinfo", "srun")
REQUIRED_ENV = "MIRAGE_TEST_SLURM"  # "required": fail instead of skip
MIN_JOB_AGE_S = 10
START_TIMEOUT_S = 60


def free_ports(count):
    """``count`` TCP ports free right now on 127.0.0.1 (for slurmctld and slurmd)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def slurm_conf(folder, node, ports, cpus):
    """The text of a one-node slurm.conf whose every file lies in ``folder``."""
    return f"""\
ClusterName=mirage-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=0
MinJobAge={MIN_JOB_AGE_S}
SlurmdParameters=config_overrides
NodeName={node} NodeHostname={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """The running cluster: its slurm.conf, node, and the client commands against it."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.conf = self.folder / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------ starting, stopping

    def start(self):
        """Start munged, slurmctld and slurmd; wait until the node takes jobs."""
        for sub in ("munge", "state", "spool", "log"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge = self.folder / "munge"
        self._daemon(["munged", f"--key-file={key}", f"--socket={munge}/munge.socket",
                      f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                      f"--seed-file={munge}/munged.seed", "--force"])
        self.conf.write_text(slurm_conf(self.folder, self.node, free_ports(2),
                                        max(4, os.cpu_count() or 1)))
        self._daemon(["slurmctld", "-f", str(self.conf)])
        self._daemon(["slurmd", "-f", str(self.conf)])
        self.wait_for_node()

    def wait_for_node(self, timeout_s=START_TIMEOUT_S):
        """Wait until the node takes jobs (after the start, or after it was set DOWN:
        ReturnToService=2 brings it back as soon as slurmd answers)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = self.run("sinfo", "--noheader", "--Node", "--format=%T", check=False)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the node did not take jobs within {timeout_s} s "
                           f"(sinfo: {out.stdout.strip() or out.stderr.strip()})")

    def _daemon(self, command):
        out = subprocess.run(command, capture_output=True, text=True, env=self.env,
                             timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{command[0]} did not start (exit {out.returncode}): "
                               f"{(out.stderr or out.stdout).strip()[-500:]}")

    def stop(self):
        """Cancel every job, then stop the daemons (SIGTERM, SIGKILL after 20 s)."""
        with contextlib.suppress(Exception):
            self.run("scancel", f"--user={os.getuid()}", check=False)
            self.wait_for(lambda: not self.run("squeue", "--noheader", check=False)
                          .stdout.strip(), 60, "the queue to empty")
        for pid_file in (self.folder / "slurmd.pid", self.folder / "slurmctld.pid",
                         self.folder / "munge" / "munged.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
                if not process_gone(pid, wait_s=20):
                    os.kill(pid, signal.SIGKILL)
                    process_gone(pid, wait_s=5)

    def log_tail(self, lines=20):
        """The end of the daemons' logs, for a message on why the cluster failed."""
        text = []
        for log in sorted(self.folder.rglob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            text.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(text)

    # ------------------------------------------------------------------ client commands

    def run(self, *command, check=True, timeout=60):
        """A SLURM client command against this cluster; its CompletedProcess."""
        out = subprocess.run(command, capture_output=True, text=True, env=self.env,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed: {out.stderr.strip()}")
        return out

    def states(self, job):
        """{task id: state} of a job (an array: every task) that SLURM remembers."""
        out = self.run("squeue", "--noheader", "--array", "--states=all", f"--jobs={job}",
                       "--format=%i|%T", check=False)
        return dict(line.split("|", 1) for line in out.stdout.split())

    def state(self, task):
        """The state of one task, or None once SLURM has forgotten it."""
        return self.states(task).get(task)

    def submit(self, *sbatch_args):
        """sbatch; the job id."""
        out = self.run("sbatch", "--parsable", *sbatch_args)
        return out.stdout.strip().split(";")[0]

    def requeue_now(self, task):
        """Requeue a task as a preemption would, and let it start again within seconds
        (SLURM otherwise holds a requeued job back for two minutes). Not at once: slurmd
        revokes the credentials of the job's earlier run, to the second, and refuses a new
        run whose credential is of that same second ("Job credential revoked")."""
        self.run("scontrol", "requeue", task)
        self.wait_for(lambda: self.state(task) == "PENDING", 60, f"{task} to be requeued")
        time.sleep(2.0)
        self.run("scontrol", "update", f"JobId={task}", "StartTime=now")

    @staticmethod
    def wait_for(condition, timeout_s, what):
        """Poll ``condition`` until it is true; AssertionError naming ``what`` after
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(0.2)


def _unavailable(reason):
    if os.environ.get(REQUIRED_ENV) == "required":
        pytest.fail(f"{REQUIRED_ENV}=required, but no SLURM cluster: {reason}")
    pytest.skip(f"no SLURM cluster: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM cluster (see the module's docstring), for the session."""
    missing = [name for name in PROGRAMS if shutil.which(name) is None]
    if missing:
        _unavailable(f"{', '.join(missing)} not found (Debian/Ubuntu: apt-get install "
                     "slurm-wlm munge; .ci/run does)")
    if os.geteuid() != 0:
        _unavailable("slurmd runs jobs as their users and must be started as root")
    # A short path: the munge socket's name must fit in 108 bytes.
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="mirage-slurm-"))
    os.chmod(cluster.folder, 0o755)  # munged wants its socket's folders searchable
    try:
        cluster.start()
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        logs = cluster.log_tail()
        cluster.stop()
        shutil.rmtree(cluster.folder, ignore_errors=True)
        _unavailable(f"{err}\n{logs}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.folder, ignore_errors=True)
