"""--distribute: data parallelism with the framework's own engine (no all-reduce of ours), on the devices of
one machine or over several machines, one process per machine (or per GPU).

- JAX: keras.distribution.DataParallel over every device of every process. Several processes: the flags
  --coordinator HOST:PORT --num-processes N --process-id I call jax.distributed.initialize before Keras
  starts; each process feeds its own share of every global batch (`process_share`).
- TensorFlow: tf.distribute.MirroredStrategy on one machine; with the standard TF_CONFIG set,
  MultiWorkerMirroredStrategy (one process per worker), which splits every global batch across workers.

One writer: only the chief (TensorFlow's chief, or worker 0 when there is none; JAX's process 0) writes
checkpoints, histories, configuration and TensorBoard files. No wait is unbounded: jax.distributed has its
own timeout, and a watchdog (`Watchdog`) ends a run whose training makes no progress for --wait-timeout
seconds with one line naming what it waited for (exit code 1), instead of a silent hang.

The flag and TF_CONFIG checks here import no framework, so bad input is reported at once.
"""
import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from .errors import TrainingError, UsageError

WAIT_TIMEOUT_S = 600  # --wait-timeout default: far above a step or an evaluation, far below a lost night


@dataclass(frozen=True)
class Cluster:
    """Who this process is among the processes of one run."""
    processes: int = 1
    index: int = 0
    chief: bool = True
    kind: str = "one process"  # or "TF_CONFIG worker i of N" / "JAX process i of N"
    addresses: tuple = ()  # TF_CONFIG: every task's host:port, in the order of `index`


def tf_config_cluster():
    """The TensorFlow cluster TF_CONFIG describes, or None without TF_CONFIG; UsageError if it is malformed.
    The chief is the task of type "chief", or worker 0 when the cluster has no chief."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    example = ('e.g. {"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", '
               '"index": 0}}')
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        kind, index = task["type"], int(task["index"])
        members = [(role, i) for role in ("chief", "worker") for i in range(len(cluster.get(role, [])))]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"TF_CONFIG is not a cluster description ({type(error).__name__}: {error}); "
                         f"{example}") from None
    if (kind, index) not in members:
        raise UsageError(f"TF_CONFIG's task {kind} {index} is not in its cluster ({len(members)} chief and "
                         f"worker tasks); {example}")
    chief = (kind, index) == (("chief", 0) if "chief" in cluster else ("worker", 0))
    addresses = tuple(cluster[role][i] for role, i in members)
    if not all(isinstance(a, str) and a.rpartition(":")[0] and a.rpartition(":")[2].isdigit()
               and 0 < int(a.rpartition(":")[2]) < 65536 for a in addresses):
        raise UsageError(f"TF_CONFIG's cluster addresses must be host:port strings with a port from 1 to 65535, "
                         f"got {list(addresses)[:4]}; {example}")
    return Cluster(len(members), members.index((kind, index)), chief, f"TF_CONFIG {kind} {index} of {len(members)}",
                   addresses)


def wait_for_peers(cluster, timeout):
    """A bounded rendezvous before TensorFlow's cluster start-up, which waits for every worker inside C++
    while holding Python's lock (no watchdog thread can run then, and TensorFlow catches SIGTERM): this
    worker listens on its own address and connects to every other one's until all answer, or raises a
    TrainingError naming the missing ones after `timeout` seconds. A peer's check is closed by the peer
    first, so the port is free again at once for TensorFlow's server."""
    port = int(cluster.addresses[cluster.index].rpartition(":")[2])
    try:
        listener = socket.create_server(("", port))
    except OSError as error:
        raise UsageError(f"{cluster.kind} cannot listen on port {port} ({error.strerror}); is another "
                         "process using it? (fix TF_CONFIG)") from None
    listener.settimeout(0.2)
    stop = threading.Event()

    def answer():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            with connection:
                connection.settimeout(5)
                with contextlib.suppress(OSError):
                    connection.recv(1)

    thread = threading.Thread(target=answer, name="rendezvous", daemon=True)
    thread.start()
    missing = [a for i, a in enumerate(cluster.addresses) if i != cluster.index]
    deadline = time.monotonic() + timeout
    try:
        while missing and time.monotonic() < deadline:
            for address in list(missing):
                host, _, peer_port = address.rpartition(":")
                with contextlib.suppress(OSError), socket.create_connection((host, int(peer_port)), timeout=1):
                    missing.remove(address)
            time.sleep(0.2 if missing else 0)
    finally:
        stop.set()
        thread.join()
        listener.close()
    if missing:
        raise TrainingError(f"{cluster.kind}: no answer from {', '.join(missing)} within {timeout:g} s (start "
                            "every worker of TF_CONFIG with the same command, or raise --wait-timeout)")


def check(config):
    """The scale-out flags, before any framework starts: the three JAX flags together, a port, the process
    index in range, TF_CONFIG readable. Returns this process's Cluster."""
    if config.distribute and config.backend == "torch":
        raise UsageError("--distribute is not supported on the PyTorch backend (use KERAS_BACKEND=jax or "
                         "tensorflow, or train without --distribute)")
    given = [flag for flag, value in (("--coordinator", config.coordinator), ("--num-processes", config.num_processes),
                                      ("--process-id", config.process_id)) if value is not None]
    if given and len(given) < 3:
        raise UsageError(f"{', '.join(given)} given without the others: multi-process JAX needs all of "
                         "--coordinator HOST:PORT --num-processes N --process-id I")
    if given:
        host, _, port = config.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--coordinator {config.coordinator!r} needs a host and a port, e.g. 10.0.0.1:1234")
        if not 0 <= config.process_id < config.num_processes:
            raise UsageError(f"--process-id {config.process_id} is out of range: 0 to {config.num_processes - 1} "
                             f"for --num-processes {config.num_processes}")
        if not config.distribute:
            raise UsageError("--coordinator and the process flags need --distribute")
        return Cluster(config.num_processes, config.process_id, config.process_id == 0,
                       f"JAX process {config.process_id} of {config.num_processes}")
    cluster = tf_config_cluster() if config.distribute else None
    return cluster or Cluster()


def gather_processes(coordinator, processes, index, timeout):
    """A bounded rendezvous before jax.distributed.initialize, whose own timeout ends the process with a
    fatal error and a core dump: process 0 listens on the coordinator's port until the N - 1 others have
    checked in, then lets them all go; the others connect until process 0 answers. Any process that waits
    longer than `timeout` seconds raises a TrainingError naming what it waited for. The listener is closed
    before JAX's coordination service takes the port, each connection closed by the other side first."""
    host, _, port = coordinator.rpartition(":")
    deadline = time.monotonic() + timeout
    if index == 0:
        try:
            listener = socket.create_server(("", int(port)))
        except OSError as error:
            raise UsageError(f"--coordinator {coordinator}: process 0 cannot listen on port {port} "
                             f"({error.strerror}); choose a free port") from None
        arrived = {}
        with listener:
            listener.settimeout(0.5)
            while len(arrived) < processes - 1 and time.monotonic() < deadline:
                with contextlib.suppress(socket.timeout, OSError):
                    connection, _ = listener.accept()
                    connection.settimeout(5)
                    index = _process_index(connection.recv(16), processes)
                    if index is None:  # not one of ours (a port scan, a stray client): ignored
                        connection.close()
                        continue
                    arrived[index] = connection
            for connection in arrived.values():
                with connection, contextlib.suppress(OSError):
                    connection.sendall(b"go" if len(arrived) == processes - 1 else b"no")
                    connection.recv(1)  # the other side closes first
        missing = sorted(set(range(1, processes)) - set(arrived))
        if missing:
            raise TrainingError(f"JAX process 0 of {processes}: processes {', '.join(map(str, missing))} did not "
                                f"join at --coordinator {coordinator} within {timeout:g} s (start all of them with "
                                "the same command, or raise --wait-timeout)")
        return
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=1) as connection:
                connection.sendall(str(index).encode())
                connection.settimeout(max(deadline - time.monotonic(), 0.1))
                if connection.recv(2) == b"go":
                    return
        except OSError:
            time.sleep(0.5)
    raise TrainingError(f"JAX process {index} of {processes}: no answer from process 0 at --coordinator "
                        f"{coordinator} within {timeout:g} s (start all of them with the same command, or raise "
                        "--wait-timeout)")


def _process_index(message, processes):
    """The index a joining process sends (its decimal --process-id), or None for anything else."""
    text = message.decode("ascii", errors="replace").strip()
    if not text.isdigit() or len(text) > 6 or not 1 <= int(text) < processes:
        return None
    return int(text)


def start_processes(config):
    """jax.distributed.initialize for --coordinator, before Keras touches a device, after a bounded
    rendezvous of all the processes (gather_processes)."""
    if config.coordinator is None:
        return
    gather_processes(config.coordinator, config.num_processes, config.process_id, config.wait_timeout)
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives across CPU processes
    try:
        jax.distributed.initialize(coordinator_address=config.coordinator, num_processes=config.num_processes,
                                   process_id=config.process_id, initialization_timeout=int(config.wait_timeout))
    except Exception as error:
        raise TrainingError(f"process {config.process_id} could not join the {config.num_processes} processes at "
                            f"--coordinator {config.coordinator} within {config.wait_timeout:g} s: "
                            f"{str(error).splitlines()[0]}") from None


def distribution(config, cluster):
    """(scope to build and train in, number of replicas) for --distribute; the framework's own engine.
    BatchNorm: on JAX the step is one program over the sharded global batch, so XLA all-reduces the batch
    statistics (synchronized BN); on TensorFlow the layers are switched to synchronized=True."""
    import keras
    backend = keras.backend.backend()
    if not config.distribute:
        return contextlib.nullcontext(), 1
    if backend == "jax":
        devices = keras.distribution.list_devices()
        # several processes: each feeds its own share of every batch (process_share), already split
        keras.distribution.set_distribution(keras.distribution.DataParallel(
            devices=devices, auto_shard_dataset=cluster.processes == 1))
        return contextlib.nullcontext(), len(devices)
    if backend == "tensorflow":
        import tensorflow as tf
        if cluster.processes > 1:
            wait_for_peers(cluster, config.wait_timeout)
            options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=config.wait_timeout)
            strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        else:
            devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
            strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
        return strategy.scope(), strategy.num_replicas_in_sync
    raise UsageError(f"--distribute is not supported on the {backend} backend "
                     "(use KERAS_BACKEND=jax or tensorflow, or train without --distribute)")


def process_share(order, batch_size, cluster, backend):
    """The rows of `order` (one epoch's images, in global batches of batch_size) that this process feeds.
    JAX: every process feeds its own 1/N of each global batch (keras.distribution assembles the global
    batch from the processes' shares). TensorFlow: every worker feeds the global batches, and
    MultiWorkerMirroredStrategy splits them. A last global batch that does not split is cut to a multiple
    of N (at most N - 1 images of an evaluation are left out; training batches are whole)."""
    if cluster.processes == 1 or backend != "jax":
        return order, batch_size
    share = batch_size // cluster.processes
    mine = []
    for start in range(0, len(order), batch_size):
        part = order[start:start + batch_size]
        each = len(part) // cluster.processes
        mine.append(part[cluster.index * each:(cluster.index + 1) * each])
    return np.concatenate(mine), share


def is_runtime_error(error):
    """An error the framework raised while running (a collective that timed out, a worker that stopped
    answering), as opposed to a bug of ours: TensorFlow's OpError, XLA's runtime error."""
    return type(error).__module__.split(".")[0] in ("tensorflow", "jaxlib", "jax")


def synchronize_batch_norm(model, on):
    """TensorFlow replicas see only their share of the batch: synchronized BN uses the global batch's
    statistics, as one device would. Switched off again before saving (the option is TensorFlow-only)."""
    import keras
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = on


class Watchdog:
    """Ends the process (exit code 1, one line) when no training or evaluation step has finished for
    `timeout` seconds: a device or a worker that never reaches a collective would otherwise hang the run
    (XLA's CPU collectives wait 15 minutes, then abort with a core dump; gloo and gRPC longer). `beat()` is
    called at every step's end; the first deadline also covers start-up and compilation."""

    def __init__(self, timeout, waiting_for):
        self.timeout, self.waiting_for = timeout, waiting_for
        self.last = time.monotonic()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def beat(self):
        self.last = time.monotonic()

    def _watch(self):
        while not self.stopped.wait(min(self.timeout / 10, 10)):
            if time.monotonic() - self.last > self.timeout:
                prog = os.path.basename(sys.argv[0])
                print(f"{prog}: training failed: no step finished in {self.timeout:g} s, waiting for "
                      f"{self.waiting_for}; check that every one is running (raise --wait-timeout for a "
                      "slow start)", file=sys.stderr, flush=True)
                os._exit(1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()


class Processes:
    """Everything a run does because it trains on several devices or processes, behind one context; a run on one
    device passes through it unchanged:

        with Processes(config, cluster, paths) as processes:   # joins the others, enters the strategy's scope
            model = build(); processes.prepare(model)           # before compile: synchronized BN (TensorFlow)
            compile(model); processes.prepare_fit(model)        # after compile: the multi-worker fit() fixes
            with processes.training():                          # a lost worker or device: one line, exit 1
                fit(model, ..., paths=processes.writes, beat=processes.beat)
            processes.finish(model)                             # BN back to Keras's own before saving

    `writes`: where this process writes (the chief: the run's own files; any other process: a private folder
    deleted at the end). `beat`: the watchdog's, called after every step (None without --distribute)."""

    def __init__(self, config, cluster, paths):
        self.config, self.cluster, self.paths = config, cluster, paths
        self.stack = contextlib.ExitStack()
        self.devices, self.beat, self.writes = 1, None, paths

    def __enter__(self):
        import tempfile

        from .outputs import private_run_paths
        config, cluster = self.config, self.cluster
        with self.stack:  # unwound here if anything below fails
            # Joining the others is bounded by --wait-timeout on its own (jax.distributed's timeout,
            # wait_for_peers for TensorFlow); from then on the watchdog bounds every wait.
            start_processes(config)  # JAX: before anything asks for a device
            scope, self.devices = distribution(config, cluster)
            if config.distribute:
                waiting_for = f"the other {'workers' if cluster.processes > 1 else 'devices'} ({cluster.kind})"
                self.beat = self.stack.enter_context(Watchdog(config.wait_timeout, waiting_for)).beat
            if not cluster.chief:
                folder = self.stack.enter_context(tempfile.TemporaryDirectory(prefix="worker-"))
                self.writes = private_run_paths(folder, config.run_name)
            if config.batch_size % self.devices:
                raise UsageError(f"--batch-size {config.batch_size} does not split over {self.devices} devices "
                                 f"(use a multiple of {self.devices})")
            self.stack.enter_context(scope)
            self.stack = self.stack.pop_all()
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)

    def prepare(self, model):
        import keras
        if self.config.distribute and keras.backend.backend() == "tensorflow":
            synchronize_batch_norm(model, True)

    def prepare_fit(self, model):
        from .workarounds import prepare_multi_worker_fit
        prepare_multi_worker_fit(model, self.config.batch_size, self.cluster.processes)

    @contextlib.contextmanager
    def training(self):
        """A worker or device lost mid-run: the framework's error as one line (TrainingError)."""
        try:
            yield
        except (UsageError, TrainingError):
            raise
        except Exception as error:
            if self.config.distribute and (self.cluster.processes > 1 or is_runtime_error(error)):
                message = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
                raise TrainingError(f"{self.cluster.kind}: {message} (a worker or device was lost; every "
                                    "completed epoch is saved: rerun all with --resume)") from None
            raise

    def finish(self, model):
        synchronize_batch_norm(model, False)
