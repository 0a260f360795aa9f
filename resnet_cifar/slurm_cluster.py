"""What reproduce.py asks a SLURM cluster, through SLURM's own commands: whether a request can ever run there
(checked before anything is submitted), and the state of the jobs a sweep submitted.

Every question is one short command (scontrol, sinfo, squeue, sacct) with a timeout; nothing here writes.
Accounting (sacct) is optional: squeue alone follows a job while it is queued, running, and for SLURM's
MinJobAge (300 s by default) after it ends; sacct, where the cluster has it, answers after that.
"""
import re
import shutil
import subprocess

from .errors import UsageError

QUERY_TIMEOUT_S = 60  # a loaded slurmctld answers within seconds; past this the sweep reports it and moves on

# States in which a job may still run its script (squeue's long names). Anything else has ended.
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                    "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED"})

# Pending reasons that no amount of waiting clears: the request exceeds the partition's or the account's
# limits, or names something that does not exist (squeue's %r; SLURM's job_reason list).
NEVER_CLEARS = frozenset({"PartitionConfig", "PartitionTimeLimit", "PartitionNodeLimit", "BadConstraints",
                          "InvalidAccount", "InvalidQOS", "DependencyNeverSatisfied", "QOSMaxWallDurationPerJobLimit",
                          "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob", "QOSMaxNodePerJobLimit",
                          "AssocMaxWallDurationPerJobLimit", "AssocMaxCpuPerJobLimit", "AssocMaxGRESPerJob",
                          "AssocMaxNodesPerJobLimit"})

# How long submitit's warning (--signal=USR2@N) comes before the time limit: enough to stop the run and requeue
# it (the script stops at its next step and keeps its last complete epoch: seconds), and never so early in a
# short job that the warning arrives at its start.
WARNING_S = 300
WARNING_FRACTION = 4  # a job shorter than 4 x WARNING_S is warned at a quarter of its time before its limit


def warning_seconds(minutes):
    """Seconds between submitit's USR2 warning and the time limit of a job of `minutes` minutes."""
    return min(WARNING_S, minutes * 60 // WARNING_FRACTION)


def _query(command):
    """(return code, stdout, stderr) of one SLURM command; UsageError when SLURM is not installed here."""
    if shutil.which(command[0]) is None:
        raise UsageError(f"{command[0]} not found: run reproduce.py on a SLURM login node (or use --executor local)")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return 1, "", f"{command[0]} did not answer in {QUERY_TIMEOUT_S} s"
    return done.returncode, done.stdout, done.stderr


def parse_minutes(text):
    """SLURM's time limits in minutes: UNLIMITED/INFINITE -> None; 'D-HH:MM:SS', 'D-HH', 'HH:MM:SS', 'MM:SS',
    'MM' as SLURM writes them."""
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH[:MM[:SS]]
        hours, minutes = (parts + [0])[:2]
    elif len(parts) == 3:  # HH:MM:SS
        hours, minutes = parts[:2]
    else:  # MM or MM:SS
        hours, minutes = 0, parts[0]
    return (int(days or 0) * 24 + hours) * 60 + minutes  # seconds dropped: a request must fit in whole minutes


def gpus_of(gres):
    """GPUs in a node's generic resources as sinfo prints them ('gpu:a100:4(S:0-1),shard:8' -> 4; '(null)' -> 0)."""
    return sum(int(m.group(1)) for m in re.finditer(r"(?:^|,)gpu(?::[^:,()]+)*:(\d+)", gres))


def partition(name):
    """The partition's settings (scontrol's key=value pairs) and its nodes as (name, CPUs, GPUs)."""
    code, out, err = _query(["scontrol", "show", "partition", name, "--oneliner"])
    if code != 0 or "PartitionName=" not in out:
        _, names, _ = _query(["sinfo", "--noheader", "--format", "%R"])
        known = ", ".join(sorted(set(names.split()))) or "none"
        raise UsageError(f"--partition {name}: no such partition on this cluster ({known}); give one of them")
    settings = dict(item.split("=", 1) for item in out.split() if "=" in item)
    _, out, _ = _query(["sinfo", "--noheader", "--Node", "--partition", name, "--format", "%N|%c|%G"])
    nodes = sorted({(n, int(c), gpus_of(g)) for n, c, g in (line.split("|") for line in out.split())})
    return settings, nodes


def check_request(name, cpus, gpus, minutes):
    """UsageError (one line naming the fix) unless a job of this size can ever run in partition `name`."""
    settings, nodes = partition(name)
    most_cpus = max((c for _, c, _ in nodes), default=0)
    if cpus > most_cpus:
        raise UsageError(f"--cpus-per-run {cpus}: the largest node of partition {name} has {most_cpus} CPUs "
                         f"(ask for at most {most_cpus})")
    most_gpus = max((g for _, c, g in nodes if c >= cpus), default=0)
    if gpus > most_gpus:
        raise UsageError(f"--gpus-per-run {gpus}: partition {name} has no node with {gpus} GPUs and {cpus} CPUs "
                         f"(at most {most_gpus} GPUs; --gpus-per-run 0 trains on the CPUs)")
    limit = parse_minutes(settings.get("MaxTime", "UNLIMITED"))
    if limit is not None and minutes > limit:
        raise UsageError(f"--time {minutes}: partition {name} allows at most {limit} minutes (MaxTime="
                         f"{settings['MaxTime']}); ask for less, runs continue in requeued jobs")


def queue_states(job_ids):
    """{job id: (state, reason)} for the jobs SLURM still lists (queued, running, or ended within MinJobAge);
    None when squeue did not answer."""
    if not job_ids:
        return {}
    code, out, err = _query(["squeue", "--noheader", "--states=all", "--jobs", ",".join(job_ids),
                             "--format", "%i|%T|%r"])
    if code != 0 and "Invalid job id" not in err:  # none of them listed any more: an empty answer
        return None
    states = {}
    for line in out.split():
        job_id, state, reason = line.split("|", 2)
        states[job_id] = (state, reason)
    return states


def accounting_states(job_ids):
    """{job id: state} from accounting for jobs squeue no longer lists; None where the cluster has no sacct."""
    if not job_ids or shutil.which("sacct") is None:
        return None
    code, out, _ = _query(["sacct", "--noheader", "--allocations", "--parsable2", "--jobs", ",".join(job_ids),
                           "--format", "JobID,State"])
    if code != 0:
        return None
    return {job_id: state.split()[0] for job_id, state in (line.split("|", 1) for line in out.split("\n") if line)}


def cancel(job_ids):
    """scancel: the jobs are ended (a pending one never starts)."""
    if job_ids:
        _query(["scancel", *job_ids])
