"""The runs of a sweep as jobs (submitit): what a job runs, how it survives what a scheduler does to it, and how
reproduce.py follows its jobs to the end.

A job runs its family script as a child process and decides `--resume` when it starts, from the run's own
files, so a job that SLURM requeues by itself (pre-emption, `scontrol requeue`: SIGTERM, then the job's
submission-time command again) continues its run. A run stopped by the scheduler's signal leaves no result
behind: the sweep then follows the job's own state (requeued, or cancelled) instead of calling it failed.

The sweep records each run's job id in <out>/jobs.json as it submits, so a rerun adopts the jobs still queued
or running instead of submitting them twice; it reads job states with squeue (and sacct once squeue has
forgotten a job), prints every change and, every minute, what it waits for.
"""
import contextlib
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

from . import slurm_cluster
from .errors import STOP_SIGNALS, UsageError
from .outputs import write_text

POLL_S = 0.2  # how often a job looks at its script, and the handler at a stopping script
CHILD_STOP_S = 120  # the script stops at its next step (seconds for the largest network); past this it is killed
STATUS_EVERY_S = 60  # how often it says what it is waiting for
VANISHED_S = 60  # a job that neither squeue nor sacct knows for this long is gone (no result, no state)


def history_rows(path):
    """Completed epochs in a history CSV (0 when it does not exist)."""
    try:
        with open(path, newline="") as f:
            return sum(1 for _ in csv.DictReader(f))
    except OSError:
        return 0


def run_status(files, epochs):
    """finished (the model saved, every epoch in the history), interrupted (a state or configuration saved), new."""
    if os.path.isfile(files["model"]) and history_rows(files["history"]) >= epochs:
        return "finished"
    if os.path.exists(files["state"]) or os.path.exists(files["saved"]):
        return "interrupted"
    return "new"


def wait_for(process, timeout=math.inf):
    """The exit code of `process` once the thread waiting on it has seen it end (None after `timeout` seconds),
    read without touching Popen's wait lock, so a signal handler may call it while the job's own call does too."""
    deadline = time.monotonic() + timeout
    while process.returncode is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return process.returncode


class TrainingJob:
    """What submitit runs: the family script as a child process, with --resume when the run has files.

    SLURM's warning (USR2) reaches the script and this wrapper alike: the script stops at its next step and keeps
    its last complete epoch; submitit calls checkpoint(), which waits for it and hands back the same job, and
    requeues. The wrapper waits for its child in a thread, never in Popen.wait() on its own thread: a signal
    handler that waited on the same Popen would stall until its timeout (Popen's wait lock is not reentrant)."""

    def __init__(self, command, files, epochs, env=None):
        self.command, self.files, self.epochs, self.env = list(command), dict(files), epochs, dict(env or {})
        self.process = None

    def __call__(self):
        status = run_status(self.files, self.epochs)
        if status == "finished":  # requeued after its last save
            return 0
        command = [*self.command, "--resume"] if status == "interrupted" else self.command
        self.process = subprocess.Popen(command, env={**os.environ, **self.env})
        threading.Thread(target=self.process.wait, daemon=True).start()
        code = wait_for(self.process)  # the signal handlers run here
        if code == 0:
            return 0
        if code - 128 in STOP_SIGNALS:
            # The scheduler stops the job: it requeues it (pre-emption, scontrol requeue) or ends it (scancel). No
            # result: the sweep follows the job's own state.
            print(f"sweep job: the run stopped on {signal.Signals(code - 128).name}; its job is requeued or "
                  "cancelled by the scheduler", file=sys.stderr, flush=True)
            os._exit(code)
        raise RuntimeError(f"the training script exited with {code}")

    def checkpoint(self, *args, **kwargs):
        """submitit's handler of the time-limit warning or pre-emption: stop the script, wait for it (at most
        CHILD_STOP_S), and requeue the same job."""
        import submitit
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGUSR2)  # SLURM sent it too; the script takes one stop signal
            if wait_for(process, CHILD_STOP_S) is None:
                process.kill()
        return submitit.helpers.DelayedSubmission(TrainingJob(self.command, self.files, self.epochs, self.env))


def last_line(log, script):
    """The script's own last line in a job's stderr log (`script: ...`), else the log's last line."""
    try:
        with open(log, errors="replace") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError:
        return ""
    own = [line for line in lines if line.startswith(f"{script}: ")]
    return (own or [line for line in lines if not line.startswith("submitit ")] or [""])[-1][:300]


class JobRecord:
    """<out>/jobs.json: {run name: job id} of the jobs this sweep submitted, written after each submission."""

    def __init__(self, out):
        self.path = os.path.join(out, "jobs.json")
        try:
            with open(self.path) as f:
                self.ids = {str(k): str(v) for k, v in json.load(f).items()}
        except FileNotFoundError:
            self.ids = {}
        except (OSError, ValueError, AttributeError) as error:
            raise UsageError(f"cannot read {self.path} ({type(error).__name__}): fix it, or remove it if none of "
                             "its jobs still runs") from None

    def add(self, name, job_id):
        self.ids[name] = job_id
        write_text(self.path, json.dumps(self.ids, indent=1) + "\n")


class SlurmJobs:
    """The sweep's side of SLURM: submit, adopt, and read the state of its jobs."""

    poll_s = 5  # how often the sweep asks SLURM about its jobs

    def __init__(self, executor, folder, out):
        self.executor, self.folder, self.record = executor, folder, JobRecord(out)
        self.unseen_since = {}

    def adopt(self, runs):
        """{run: job id} of the runs whose recorded job is still queued or running."""
        recorded = {run: self.record.ids[run.name] for run in runs if run.name in self.record.ids}
        states = slurm_cluster.queue_states(sorted(set(recorded.values()))) or {}
        return {run: job_id for run, job_id in recorded.items()
                if states.get(job_id, ("",))[0] in slurm_cluster.ACTIVE}

    def submit(self, run, slot, submitted):
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal too: said once below
                job = self.executor.submit(run.job())
        except Exception as error:  # sbatch's refusal, as submitit passes it on
            words = [line.split("error:", 1)[-1].strip() for line in str(error).splitlines() if "error:" in line]
            raise UsageError(f"sbatch refused the job of {run.label!r}, seed {run.seed}: "
                             f"{(words or [str(error).strip()])[0][:200]}"
                             + (f" ({submitted} jobs submitted before it are in {self.record.path}: a rerun "
                                "follows them)" if submitted else "")) from None
        self.record.add(run.name, job.job_id)
        return job.job_id

    def states(self, job_ids):
        """{job id: (state, reason)}; VANISHED for a job neither squeue nor sacct has known for VANISHED_S."""
        states = slurm_cluster.queue_states(job_ids)
        if states is None:  # squeue did not answer: ask again at the next poll
            return {job_id: ("UNKNOWN", "squeue did not answer") for job_id in job_ids}
        unlisted = [job_id for job_id in job_ids if job_id not in states]
        accounted = slurm_cluster.accounting_states(unlisted) or {}
        now = time.monotonic()
        for job_id in unlisted:
            if job_id in accounted:
                states[job_id] = (accounted[job_id], "sacct")
            elif now - self.unseen_since.setdefault(job_id, now) >= VANISHED_S:
                states[job_id] = ("VANISHED", f"unknown to squeue and sacct for {VANISHED_S} s")
            else:
                states[job_id] = ("UNKNOWN", "not listed")
        return states

    def log(self, job_id):
        from submitit.core.utils import JobPaths
        return JobPaths(self.folder, job_id=job_id, task_id=0).stderr

    def cancel(self, job_ids):
        slurm_cluster.cancel(job_ids)


class LocalJobs:
    """submitit's local executor: the job is a process here; it has ended when submitit says it is done."""

    poll_s = 1

    def __init__(self, executor, gpus, runs_per_gpu):
        self.executor, self.gpus, self.runs_per_gpu = executor, gpus, runs_per_gpu
        self.jobs = {}

    def adopt(self, runs):
        return {}

    def submit(self, run, slot, submitted):
        job = self.executor.submit(run.job(gpu_env(slot, self.gpus, self.runs_per_gpu)))
        self.jobs[job.job_id] = job
        return job.job_id

    def states(self, job_ids):
        return {job_id: ("ENDED" if self.jobs[job_id].done() else "RUNNING", "") for job_id in job_ids}

    def log(self, job_id):
        return self.jobs[job_id].paths.stderr

    def cancel(self, job_ids):
        for job_id in job_ids:
            self.jobs[job_id].cancel(check=False)


def gpu_env(slot, gpus, runs_per_gpu):
    """The environment of the run in `slot` on a machine with `gpus` GPUs: its GPU, and with several runs per GPU
    each backend's memory settings made to share it."""
    if not gpus:
        return {}
    env = {"CUDA_VISIBLE_DEVICES": str(slot % gpus)}
    if runs_per_gpu > 1:
        env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / runs_per_gpu:.2f}",
                   TF_FORCE_GPU_ALLOW_GROWTH="true", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    return env


def follow(jobs, pending, total, done, slots):
    """Submits (or adopts) every pending run, `slots` at a time, and follows each job to its end: one line per
    state change and per finished run, a status line every STATUS_EVERY_S. Returns how many runs failed.
    UsageError when a job can never start (its pending reason never clears): it is cancelled."""
    queue = list(pending)
    active = {}  # job id -> [run, last state, slot]
    for run, job_id in jobs.adopt(queue).items():
        queue.remove(run)
        active[job_id] = [run, None, len(active)]
        print(f"{run.label}, seed {run.seed}: following job {job_id}, submitted by an earlier invocation", flush=True)
    failed, submitted, last_status = 0, len(active), time.monotonic()
    while queue or active:
        free = sorted(set(range(slots)) - {slot for _, _, slot in active.values()})
        while queue and free:
            run = queue.pop(0)
            slot = free.pop(0)
            job_id = jobs.submit(run, slot, submitted)
            submitted += 1
            active[job_id] = [run, None, slot]
        time.sleep(jobs.poll_s)
        states = jobs.states(sorted(active))
        never = [job_id for job_id, (state, reason) in states.items()
                 if state == "PENDING" and reason in slurm_cluster.NEVER_CLEARS]
        if never:
            jobs.cancel(never)
            run = active[never[0]][0]
            raise UsageError(f"job {never[0]} ({run.label}, seed {run.seed}) can never start: SLURM's pending reason "
                             f"is {states[never[0]][1]} (the request exceeds the partition's or account's limits); "
                             f"cancelled {len(never)} such jobs: ask for fewer CPUs, GPUs or minutes")
        for job_id, (state, reason) in states.items():
            run, seen, slot = active[job_id]
            if state in slurm_cluster.ACTIVE or state == "UNKNOWN":
                if state not in (seen, "UNKNOWN", "COMPLETING"):
                    requeued = state.startswith("REQUEUE") or (seen == "RUNNING" and state == "PENDING")
                    note = (": stopped by the scheduler and requeued; it continues from its last complete epoch"
                            if requeued else f" ({reason})" if state == "PENDING" else "")
                    print(f"{run.label}, seed {run.seed}: job {job_id} {state}{note}", flush=True)
                    active[job_id][1] = state
                continue
            del active[job_id]
            if run.status() == "finished":
                done += 1
                outcome = f"final test acc {run.final_accuracy():.4f}"
            else:
                failed += 1
                why = last_line(jobs.log(job_id), run.script) or state
                outcome = f"FAILED (job {job_id} {state}: {why}); log: {jobs.log(job_id)}"
            print(f"[{done}/{total} done] {run.label}, seed {run.seed}: {outcome}", flush=True)
        if active and time.monotonic() - last_status >= STATUS_EVERY_S:
            last_status = time.monotonic()
            print("waiting for " + "; ".join(
                f"job {job_id} {states[job_id][0]}" + (f" ({states[job_id][1]})" if states[job_id][0] == "PENDING"
                                                       else "") + f" [{run.label}, seed {run.seed}]"
                for job_id, (run, _, _) in sorted(active.items())), flush=True)
    return failed
