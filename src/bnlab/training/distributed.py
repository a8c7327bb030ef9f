"""Data-parallel training on torch.distributed: N processes that behave like one process with the whole batch.

    bnlab train --nproc 2                                     # this machine, two worker processes
    torchrun --nnodes 2 --nproc-per-node 4 -m bnlab.cli train # several machines: the same program

What changes with N processes, and what does not:
- **Data.** Every process draws the same global batch (the single-process order: same seed) and
  keeps its own contiguous shard of it (``tensor_split``: sizes differ by at most one, and a process
  may get none).
- **Batch norm** is synchronized: ``bnlab.convert(model, to="sync")`` makes every BN layer (PyTorch's
  or bnlab's) a bnlab layer with the process group, so statistics, and the gradients through them,
  are those of the global batch.
- **Gradients**: DistributedDataParallel averages them over processes (gloo on CPU, nccl on CUDA).
  Each process's loss is its shard's *sum* scaled by N / global batch size, so the average is the
  gradient of the global batch's mean loss whatever the shard sizes; the logged loss is the
  global batch's mean (one all_reduce of two numbers per step).
- **Decisions** to stop (a NaN loss, a diverged evaluation on rank 0, a time budget) are agreed
  by all processes after every step (one all_reduce of one number; a second, before the hooks,
  when there is a time budget), so no process waits for a peer that left. A process that dies or
  is interrupted is not voted on: the launcher (``launch``, or torchrun) ends its peers.
- **Output**: rank 0 alone evaluates (in eval mode: no collective, so validation cannot hang), logs,
  shows progress and writes the run directory and checkpoints. Resuming reads the run directory
  on every process, so on several machines it must be on a shared file system.
- **Faults**: ``--nproc`` starts the workers itself (``launch``) and stops the job as one process
  stops: Ctrl-C or SIGTERM interrupts rank 0 first, which records "interrupted" as a lone process
  does, then its peers are killed; a worker that dies (even from SIGKILL) ends the job within
  seconds with one line naming its rank. The last checkpoint stays valid and ``--resume`` continues
  from it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import IO, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab.data import Batches
from bnlab.errors import BnlabError, Interrupted, UsageError
from bnlab.training.evaluate import loss_fn

STOP_REASONS = ("time", "diverged")  # agreed by code: the largest wins
RENDEZVOUS_TIMEOUT = timedelta(seconds=60)
LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCHED = "BNLAB_LAUNCHED"  # in the workers of ``launch``: the launcher's pid (a leftover value is another's)
PEER_FAILED = 3  # exit status of a worker of ``launch`` that stopped, silently, because a peer failed
INTERRUPTED = 130
STOP_SECONDS = 3.0  # what a stopping job's workers get to finish before they are killed
POLL_SECONDS = 0.05
# A worker's first lines: an interrupt before its entry runs ends it at once (it has written nothing).
# It starts with SIGINT and SIGTERM blocked (``launch`` blocks them around the start), so none is missed.
BOOTSTRAP = (
    "import os, signal; signal.signal(signal.SIGINT, lambda *_: os._exit(130)); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM)); "
    "from bnlab.training.distributed import _worker; _worker()"
)


@dataclass(frozen=True)
class World:
    """This process's place in the group: its rank, the group's size, and the group."""

    rank: int
    size: int
    group: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: Tensor) -> Tensor:
        """This process's contiguous part of a global batch's indices."""
        return indices.tensor_split(self.size)[self.rank]

    def mean_loss(self, kind: str, logits: Tensor, labels: Tensor) -> tuple[Tensor, float]:
        """(the loss to backpropagate, the global batch's mean loss) for this shard."""
        local_sum = loss_fn(kind, logits, labels, reduction="sum")
        totals = torch.stack([local_sum.detach(), torch.tensor(float(len(labels)), device=local_sum.device)])
        dist.all_reduce(totals, group=self.group)
        global_sum, global_n = totals.tolist()
        return local_sum * (self.size / global_n), global_sum / global_n

    def agree(self, stop: str | None) -> str | None:
        """The most serious stop reason of any process, the same on all, so that all leave the loop together
        (a hook's own reason counts as "diverged"; the process that gave it keeps its wording in ``message``)."""
        vote = torch.tensor([0 if stop is None else STOP_REASONS.index(stop) + 1 if stop in STOP_REASONS else 2])
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group)
        code = int(vote.item())
        return None if code == 0 else STOP_REASONS[code - 1]


def variables() -> dict[str, str]:
    """The launcher variables set in this process's environment (torchrun sets them for each worker), checked.

    WORLD_SIZE says whether this process is one worker of a job (more than 1) or alone; a malformed
    value, or one inconsistent with the others, raises ``UsageError`` naming the variable and the fix.
    """
    present = {name: os.environ[name] for name in LAUNCHER_VARIABLES if name in os.environ}
    fix = "torchrun sets these for each worker; unset them to train in one process, or start workers with --nproc N"

    def whole(name: str, low: int, high: int | None, meaning: str) -> int:
        text = present[name]
        value = int(text) if re.fullmatch(r"[0-9]{1,9}", text) else None
        if value is None or value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"from {low} to {high}"
            raise UsageError(f"{name}={text!r} in the environment: expected {meaning}, a whole number {bound}; {fix}")
        return value

    if "WORLD_SIZE" not in present:
        stray = [name for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE") if name in present]
        if stray:
            raise UsageError(f"{stray[0]} is set in the environment but WORLD_SIZE is not; {fix}")
        return present
    size = whole("WORLD_SIZE", 1, None, "the number of processes in the job")
    needed = ("RANK", "MASTER_ADDR", "MASTER_PORT") if size > 1 else ()
    missing = [name for name in needed if name not in present]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UsageError(f"WORLD_SIZE={size} is set in the environment but {', '.join(missing)} {verb} not; {fix}")
    if "RANK" in present:
        whole("RANK", 0, size - 1, "this process's rank")
    local_size = size
    if "LOCAL_WORLD_SIZE" in present:
        local_size = whole("LOCAL_WORLD_SIZE", 1, size, "the number of processes on this machine")
    if "LOCAL_RANK" in present:
        whole("LOCAL_RANK", 0, local_size - 1, "this process's rank on this machine")
    if "MASTER_PORT" in present:
        whole("MASTER_PORT", 1, 65535, "the rendezvous port")
    if "MASTER_ADDR" in present and not re.fullmatch(r"[^\s]+", present["MASTER_ADDR"]):
        raise UsageError(f"MASTER_ADDR={present['MASTER_ADDR']!r} in the environment is not a host name; {fix}")
    return present


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def workers_to_start(nproc: int | None, oversubscribe: bool = False) -> int:
    """How many workers a command given ``--nproc nproc`` (None: not given) must ``launch``; 0 when it runs here,
    alone or as the worker that the launcher variables say it is.

    Checked before anything starts: the variables (``variables``), that they and ``nproc`` do not both say how the
    job is started, and that there is a core for every worker unless ``oversubscribe``.
    """
    present = variables()
    if nproc is not None and present:
        settings = " ".join(f"{name}={value}" for name, value in present.items())
        raise UsageError(
            f"--nproc {nproc} starts its own workers, but the environment says this process belongs to a job that "
            f"another launcher started ({settings}): `unset {' '.join(present)}` to use --nproc, or drop --nproc"
        )
    nproc = nproc or 1
    cores = usable_cores()
    if nproc > cores and not oversubscribe:
        raise UsageError(
            f"--nproc {nproc} is more than the {cores} CPU cores this process may use: workers sharing a core take "
            f"turns, and every collective waits for the slowest; use --nproc {cores} or fewer, or add --oversubscribe"
        )
    return nproc if nproc > 1 else 0


def from_env(device: torch.device) -> World | None:
    """The World of a process started by ``--nproc`` or torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT); None alone."""
    size = int(variables().get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        try:
            dist.init_process_group(backend, timeout=RENDEZVOUS_TIMEOUT)
        except (RuntimeError, ValueError) as err:
            raise BnlabError(
                f"cannot join the process group at {where} as rank {os.environ['RANK']} of {size} "
                f"({' '.join(str(err).split())[:200]}); check MASTER_ADDR, MASTER_PORT and --nnodes"
            ) from None
    return World(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)


def peer_failure(err: BaseException) -> str | None:
    """If ``err`` is a collective that broke because another process of the group failed (or stopped), what
    broke, in gloo's first sentence ("Connection closed by peer [127.0.0.1]:40541"); None for any other error."""
    text = " ".join(str(err).split())
    if not isinstance(err, dist.DistNetworkError) and not (isinstance(err, RuntimeError) and "gloo/transport" in text):
        return None
    return re.sub(r"^\[[^\]]*\] *", "", text).split(". ")[0][:200]  # without gloo's source location


def launched() -> bool:
    """Whether this process is a worker of ``launch``, whose launcher reports interrupts and failed peers: its
    parent is the launcher that set the variable (left over in a shell, it names another process)."""
    return os.environ.get(LAUNCHED) == str(os.getppid())


def synchronize(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The model ready for data-parallel training: synchronized BN, DistributedDataParallel around it."""
    from bnlab.nn import convert

    model = convert(model, to="sync", process_group=world.group)
    device_ids = [device] if device.type == "cuda" else None
    # no buffer broadcast before each forward: synchronized BN keeps the running statistics equal everywhere
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


class ShardedBatches(Iterator[tuple[Tensor, Tensor]]):
    """This process's shard of every global batch of ``batches``."""

    def __init__(self, batches: Batches, world: World) -> None:
        self.batches, self.world = batches, world
        self.split = batches.split

    def __next__(self) -> tuple[Tensor, Tensor]:
        idx = self.world.shard(self.batches.next_indices())
        return self.split.images[idx], self.split.labels[idx]

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)


class WorkerFailed(BnlabError):
    """A worker of ``launch`` failed by itself: killed, or ended with an error of its own."""


def launch(nproc: int, entry: Callable[..., int | None], *args: Any) -> int:
    """Run ``entry(*args)`` in ``nproc`` worker processes of this machine, a torch.distributed job that each
    worker's ``from_env`` joins, and wait for them; returns 0, or rank 0's exit status if it failed and said why.

    ``entry`` must be a module-level function (the workers import it by name, as ``multiprocessing`` does)
    and return an exit status. Rank 0 writes to this process's stdout and stderr; the other ranks' output is
    kept for the message if one of them fails, since they repeat rank 0's. Raises ``WorkerFailed`` naming the
    worker that failed first, its peers killed; ``Interrupted`` on SIGINT or SIGTERM (this process's or a
    worker's), after interrupting rank 0 alone so that it records the interruption as a lone process does,
    then killing its peers. Workers run in their own process groups, so a terminal's Ctrl-C reaches this
    process only (Ctrl-Z is passed on), and they end with it even if it is killed. Call it from the main thread.
    """
    job = _Job()
    blocked = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, job.signalled) for signum in blocked}
    previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, job.paused)
    try:
        rendezvous = dist.TCPStore(
            "127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False, timeout=RENDEZVOUS_TIMEOUT
        )  # workers join it as clients (TORCHELASTIC_USE_AGENT_STORE), as they do the elastic agent's
        payload = pickle.dumps((entry, args))
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            for rank in range(nproc):
                job.start(rank, nproc, rendezvous.port, payload)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        job.wait()
        job.stop()
    finally:
        job.kill()  # whatever happened above, no worker outlives this call
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return job.outcome()


@dataclass
class _Worker:
    rank: int
    process: subprocess.Popen
    output: IO[bytes] | None  # ranks other than 0: their stdout and stderr
    status: int | None = None  # its exit status, once seen (before any kill of the launcher's)
    seen: int = 0  # the poll at which it was seen to end


class _Job:
    """``launch``'s workers, and what the launcher saw of them."""

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self.signals: list[int] = []  # SIGINT and SIGTERM received by the launcher, in order
        self.interrupted = False  # by a signal before any worker failed
        self.polls = 0

    def signalled(self, signum: int, frame: object) -> None:
        self.signals.append(signum)  # acted on by ``wait`` and ``stop``, never in the middle of them

    def paused(self, signum: int, frame: object) -> None:
        """Ctrl-Z: the workers, outside the terminal's process group, stop with the launcher and go on with it."""
        self.send(signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stopped here until SIGCONT (fg, bg)
        signal.signal(signal.SIGTSTP, self.paused)
        self.send(signal.SIGCONT)

    def send(self, signum: int) -> None:
        """Send ``signum`` to every worker's process group: the worker and anything it started."""
        for worker in self.workers:
            with contextlib.suppress(ProcessLookupError):  # its group is gone: it ended, and left nothing running
                os.killpg(worker.process.pid, signum)

    def start(self, rank: int, nproc: int, port: int, payload: bytes) -> None:
        env = os.environ | {
            "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True",
            LAUNCHED: str(os.getpid()),
        }  # fmt: skip
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // nproc)))  # no oversubscription
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        output = None if rank == 0 else tempfile.TemporaryFile()  # noqa: SIM115 (closed by kill())
        process = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP], stdin=subprocess.PIPE, stdout=output, stderr=output, env=env,
            process_group=0,
        )  # fmt: skip
        self.workers.append(_Worker(rank, process, output))
        assert process.stdin is not None
        process.stdin.write(payload)  # and the pipe stays open: the worker's lifeline
        process.stdin.flush()

    def poll(self) -> None:
        self.polls += 1
        for worker in self.workers:
            if worker.status is None and (status := worker.process.poll()) is not None:
                worker.status, worker.seen = status, self.polls

    def wait(self) -> None:
        """Until every worker has ended, one has failed, or the launcher got a signal."""
        while not self.signals:
            self.poll()
            if all(w.status is not None for w in self.workers) or any(w.status for w in self.workers):
                return
            time.sleep(POLL_SECONDS)
        self.interrupted = True

    def stop(self) -> None:
        """Give a stopping job ``STOP_SECONDS`` to end by itself (a second signal: not even that).

        Interrupted: rank 0 alone gets SIGINT, as the command run alone would, while its peers keep the
        collectives going; it records the interruption and exits, and its peers, who write nothing, are killed.
        A worker failed: its peers see the broken connection in their next collective and exit.
        """
        waiting = self.workers
        if self.interrupted:
            waiting = self.workers[:1]
            if waiting and waiting[0].status is None:
                waiting[0].process.send_signal(signal.SIGINT)
        signals, deadline = len(self.signals), time.monotonic() + STOP_SECONDS
        while any(w.status is None for w in waiting) and len(self.signals) == signals and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            self.poll()

    def kill(self) -> None:
        """Kill every worker's process group and reap the workers."""
        self.poll()
        self.send(signal.SIGKILL)
        for worker in self.workers:
            worker.process.wait()
            assert worker.process.stdin is not None
            worker.process.stdin.close()

    def outcome(self) -> int:
        if self.interrupted:
            raise Interrupted
        failed = sorted(
            (w for w in self.workers if w.status not in (None, 0, PEER_FAILED)),
            key=lambda w: (w.seen, w.status is not None and w.status >= 0, w.rank),  # the first; a killed one first
        )
        if not failed:
            if any(w.status for w in self.workers):
                raise WorkerFailed("the workers lost their connections to each other")
            return 0
        first = failed[0]
        assert first.status is not None
        if first.status == INTERRUPTED:  # SIGINT or SIGTERM sent to a worker
            raise Interrupted
        if first.status < 0:
            name = signal.Signals(-first.status).name
            raise WorkerFailed(f"worker rank {first.rank} failed (killed by signal {name})")
        if first.output is None:  # rank 0, which has said why
            return first.status
        said = _last_line(first.output)
        raise WorkerFailed(f"worker rank {first.rank} failed (exit code {first.status}{': ' + said if said else ''})")


def _last_line(output: IO[bytes]) -> str:
    output.seek(max(0, output.seek(0, os.SEEK_END) - 4096))
    lines = [line.strip() for line in output.read().decode(errors="replace").splitlines()]
    output.close()
    return next((line for line in reversed(lines) if line), "")[:300]


def _worker() -> None:
    """A worker of ``launch`` (its ``BOOTSTRAP``): the entry and arguments come on stdin, whose end means that
    the launcher is gone, and so is the job."""
    entry, args = pickle.load(sys.stdin.buffer)
    threading.Thread(target=_end_with_launcher, daemon=True).start()
    status = entry(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    # Not the interpreter's exit: destroying a process group whose collectives are in flight (rank 0 interrupted
    # mid-step) waits for the peers, which wait for it. The entry has closed its files.
    os._exit(status or 0)


def _end_with_launcher() -> None:
    # The file descriptor, not sys.stdin: a daemon thread blocked in a buffered read holds the buffer's lock,
    # and the interpreter aborts at exit when it cannot take it.
    while os.read(sys.stdin.fileno(), 4096):
        pass
    os._exit(1)  # end of file: the launcher has exited, or was killed
