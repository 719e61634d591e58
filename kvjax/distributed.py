"""Several processes as one run, through `jax.distributed`: on a TPU pod slice, a multi-GPU node, a
SLURM job, or several processes on one machine (gloo collectives on CPU).

    kvjax eval passkey ... --coordinator 10.0.0.1:1234 --num-processes 4 --process-id I   # on each host
    KVJAX_COORDINATOR=10.0.0.1:1234 KVJAX_NUM_PROCESSES=4 KVJAX_PROCESS_ID=I kvjax eval passkey ...

Without those settings, `--cluster` (or `KVJAX_CLUSTER=1`) joins a cluster that JAX finds on its own
(`jax.distributed.initialize()` without arguments: Cloud TPU pod slices, SLURM, ...); a SLURM job of
several tasks, `TPU_WORKER_HOSTNAMES` naming several hosts or `JAX_COORDINATOR_ADDRESS` do the same
without it. Otherwise the run is one process and nothing is initialized.

`init` validates before anything connects (one-line ValueErrors): all three settings or none, the
process id below the number of processes, a HOST:PORT coordinator, and, for processes other than 0,
a coordinator that accepts connections within the timeout (JAX itself aborts the process when it
cannot register, with a page of C++ stack: the check here turns the common mistake, a wrong address
or process 0 not started, into one line).

`Exchange` moves small JSON records between processes through the coordinator's key-value store
(process 0 hosts it): the eval's rows travel to process 0, which alone writes the results file, and
process 0's list of rows already done (`--resume`) travels to the others. No shared file system is
needed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time

import jax
from jax._src import distributed as jax_distributed  # the coordinator's key-value client (no public API)

ENV = {"coordinator": "KVJAX_COORDINATOR", "num_processes": "KVJAX_NUM_PROCESSES", "process_id": "KVJAX_PROCESS_ID"}
DEFAULT_TIMEOUT = 300  # seconds to wait for the coordinator and for every process to register
WAIT_MS = 7 * 24 * 3600 * 1000  # reading another process's records: as long as it works (JAX ends a dead run)


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place in the run: `index` in [0, `count`); process 0 leads (writes results)."""

    index: int = 0
    count: int = 1

    @property
    def leader(self) -> bool:
        return self.index == 0

    def share(self, items: list) -> list:
        """This process's part of `items` (every `count`-th, from `index`): parts are disjoint and
        together hold every item, in the same order as the whole."""
        return items[self.index::self.count]


def add_args(parser) -> None:
    """--coordinator, --num-processes, --process-id, --coordinator-timeout on a subcommand's parser."""
    g = parser.add_argument_group("several processes (jax.distributed; or $KVJAX_COORDINATOR, "
                                  "$KVJAX_NUM_PROCESSES, $KVJAX_PROCESS_ID)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (it listens there)")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    g.add_argument("--cluster", action="store_true",
                   help="join the cluster JAX detects by itself (Cloud TPU pod slice, SLURM): no other flag needed")
    g.add_argument("--coordinator-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait for the coordinator and the other processes (default {DEFAULT_TIMEOUT})")


def from_args(args) -> Processes:
    """`init` with a parsed command line's settings (or the environment's)."""
    return init(args.coordinator, args.num_processes, args.process_id, args.coordinator_timeout, args.cluster)


def init(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
         timeout: float = DEFAULT_TIMEOUT, cluster: bool = False) -> Processes:
    """Join the run (module docstring); returns this process's `Processes`. Call it before any JAX
    computation. A run of one process initializes nothing."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if cluster and any(v is not None for v in given.values()):
        raise ValueError("--cluster lets JAX find the hosts: do not also pass --coordinator, --num-processes "
                         "or --process-id")
    if all(v is None for v in given.values()):
        given = {k: os.environ.get(env) for k, env in ENV.items()}
        if all(v is None for v in given.values()):
            return _auto(timeout, cluster or os.environ.get("KVJAX_CLUSTER", "") in ("1", "true", "yes"))
        given = {k: (v if k == "coordinator" or v is None else _int(ENV[k], v)) for k, v in given.items()}
    missing = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"a run of several processes needs --coordinator, --num-processes and --process-id "
                         f"(or $KVJAX_COORDINATOR, ...): missing {', '.join(missing)}")
    n, i = given["num_processes"], given["process_id"]
    if n < 1:
        raise ValueError(f"--num-processes must be >= 1, got {n}")
    if not 0 <= i < n:
        raise ValueError(f"--process-id must be in [0, {n - 1}] for {n} processes, got {i}")
    if timeout <= 0:
        raise ValueError(f"--coordinator-timeout must be > 0 seconds, got {timeout}")
    host, port = _address(given["coordinator"])
    if n == 1:
        return Processes()
    if i == 0:
        _check_can_listen(host, port)
    else:
        _wait_for_coordinator(host, port, timeout)
    jax.distributed.initialize(f"{host}:{port}", num_processes=n, process_id=i,
                               initialization_timeout=max(1, int(timeout)))
    return Processes(i, n)


def _auto(timeout: float, cluster: bool) -> Processes:
    """A cluster JAX detects by itself: asked for (`--cluster`), or a SLURM job of several tasks, a TPU
    pod slice's worker list, JAX's own variables."""
    slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not (cluster or slurm or tpu_pod or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return Processes()
    jax.distributed.initialize(initialization_timeout=max(1, int(timeout)))
    return Processes(jax.process_index(), jax.process_count())


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


def _address(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:1234), got {text!r}")
    return host.strip("[]"), int(port)


def _check_can_listen(host: str, port: int) -> None:
    """Process 0 hosts the coordinator at host:port: fail now, in one line, if it cannot listen there."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ValueError(f"cannot resolve the coordinator host {host!r}: {e.strerror or e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ValueError(f"process 0 cannot listen on {host}:{port} as the coordinator: "
                             f"{e.strerror or e}") from None


def _wait_for_coordinator(host: str, port: int, timeout: float) -> None:
    """Wait until process 0 accepts connections at host:port; a one-line ValueError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ValueError(f"cannot reach the coordinator {host}:{port} within {timeout:g} s "
                                 f"({e.strerror or e}): is process 0 running there with the same "
                                 "--coordinator?") from None
            time.sleep(0.2)


def _plain(value):
    """numpy scalars in records as Python numbers."""
    return value.item()


def shutdown(procs: Processes) -> None:
    """Leave the run (every process waits for the others here)."""
    if procs.count > 1:
        jax.distributed.shutdown()


class Exchange:
    """JSON records from every process to process 0, and from process 0 to every process, through the
    coordinator's key-value store; `tag` names one exchange (one eval run)."""

    def __init__(self, procs: Processes, tag: str):
        self.procs, self.tag, self._sent = procs, tag, 0
        self._client = jax_distributed.global_state.client if procs.count > 1 else None

    def broadcast(self, name: str, value=None):
        """Process 0's `value` (JSON), returned on every process."""
        key = f"kvjax/{self.tag}/broadcast/{name}"
        if self._client is None:
            return value
        if self.procs.leader:
            self._client.key_value_set(key, json.dumps(value))
            return value
        return json.loads(self._client.blocking_key_value_get(key, WAIT_MS))

    def send(self, records: list) -> None:
        """Send records to process 0 (not called on process 0)."""
        key = f"kvjax/{self.tag}/{self.procs.index}/{self._sent:09d}"
        self._client.key_value_set(key, json.dumps(records, default=_plain))
        self._sent += 1

    def finish(self) -> None:
        """This process has sent everything (not called on process 0)."""
        self._client.key_value_set(f"kvjax/{self.tag}/{self.procs.index}/count", str(self._sent))

    def gather(self):
        """On process 0: every other process's records, process by process in the order sent; each
        process's are read once it has finished."""
        for p in range(1, self.procs.count):
            count = int(self._client.blocking_key_value_get(f"kvjax/{self.tag}/{p}/count", WAIT_MS))
            for i in range(count):
                yield json.loads(self._client.blocking_key_value_get(f"kvjax/{self.tag}/{p}/{i:09d}", WAIT_MS))
