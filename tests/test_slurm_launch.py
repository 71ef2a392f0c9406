"""The ``slurm`` launcher without a cluster: its settings checked before anything is submitted (the flow's group and
``dino pretrain --slurm-*``), the batch script it writes (parsed by bash itself), ``scontrol show job``'s line read,
and each final state Slurm can report turned into the task's outcome — including the ones the test cluster cannot
produce (OUT_OF_MEMORY and QoS preemption need accounting; NODE_FAIL, BOOT_FAIL). The job's log is read from real
files laid out as a job writes them. The real cluster runs in tests/test_slurm.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from prefect.states import Failed

from tasks.pretrain.slurm.batch_script import SlurmJob, render_batch_script, sbatch_directives, slurm_launch_spec
from tasks.pretrain.slurm.commands import base_state, exit_code, parse_job_id, parse_show_job
from tasks.pretrain.slurm.job_log import JobLog
from tasks.pretrain.slurm.outcome import SlurmJobFailed, SlurmJobNotRetried, job_outcome, retry_slurm_failure
from tasks.validation import UserInputError
from tasks.validation.pretrain_settings import PRETRAIN_GROUPS, PRETRAIN_RENAMES
from tasks.validation.settings_groups import resolve_groups
from tasks.validation.slurm_settings import SlurmSettings, time_limit_seconds
from tests.test_cli_errors import assert_user_error

#: ``scontrol show job -o`` of a job of the test cluster (Slurm 22.05), requeued once and then failed.
SHOW_JOB = ("JobId=7 JobName=dino-pretrain-1a2b3c4d UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901754 "
            "Nice=0 Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 "
            "Restarts=1 BatchFlag=1 Reboot=0 ExitCode=1:0 RunTime=00:00:41 TimeLimit=1-00:00:00 TimeMin=N/A "
            "SubmitTime=2026-12-07T05:30:01 EligibleTime=2026-12-07T05:30:11 PreemptEligibleTime=2026-12-07T05:30:11 "
            "PreemptTime=None Partition=debug NodeList=n[1-2] BatchHost=n1 NumNodes=2 NumCPUs=2 NumTasks=2 "
            "MinMemoryNode=2G Command=/shared/jobs/dino-pretrain-1a2b3c4d/job.sh "
            "WorkDir=/shared/jobs/dino-pretrain-1a2b3c4d StdOut=/shared/jobs/dino-pretrain-1a2b3c4d/slurm-7.out "
            "Comment=two words here Power=")


def _job(tmp_path: Path, **settings) -> SlurmJob:
    return SlurmJob(name="dino-pretrain-1a2b3c4d", job_dir=tmp_path / "dino-pretrain-1a2b3c4d", nnodes=2,
                    nproc_per_node=4, gpus_per_node=4, settings=SlurmSettings(**settings), python="/venv/bin/python")


def test_settings_are_checked_and_name_their_field():
    assert time_limit_seconds("90") == 5400 and time_limit_seconds("1:30") == 90
    assert time_limit_seconds("2:00:00") == 7200 and time_limit_seconds("1-12") == 129600
    assert time_limit_seconds("1-00:30:00") == 88200 and time_limit_seconds("UNLIMITED") is None
    bad = [({"time_limit": "a day"}, "slurm.time_limit: not a Slurm time limit"),
           ({"time_limit": "4", "signal_lead_s": 300}, "signal_lead_s (300 s) must be shorter than time_limit"),
           ({"extra_sbatch": ["--nodes=4"]}, "--nodes is set by the launcher"),
           ({"extra_sbatch": ["exclusive"]}, "is not an sbatch option"),
           ({"mem": "lots"}, "slurm.mem: must be a size"),
           ({"partition": "gpu\n#SBATCH --account=x"}, "slurm.partition: must be a Slurm name"),
           ({"setup": ["module load x\nrm -rf /"]}, "slurm.setup: must be single lines"),
           ({"signal_lead_s": 5}, "slurm.signal_lead_s"), ({"partitio": "gpu"}, "slurm.partitio")]
    for given, message in bad:
        with pytest.raises(UserInputError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")):
            resolve_groups(PRETRAIN_GROUPS, {"slurm": given}, {}, PRETRAIN_RENAMES)
    groups, _ = resolve_groups(PRETRAIN_GROUPS, {"slurm": {"extra_sbatch": ["#SBATCH --exclusive"]}}, {},
                               PRETRAIN_RENAMES, {"slurm": {"partition": "gpu", "time_limit": "24:00:00"}})
    # a partial group on the deployment's: its other fields kept; an extra line as the option it sets
    assert (groups["slurm"].partition, groups["slurm"].extra_sbatch) == ("gpu", ["--exclusive"])


def test_the_batch_script_asks_for_the_signal_requeues_and_carries_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    job = _job(tmp_path, partition="gpu", account="vision", qos="high", time_limit="24:00:00", constraint="a100&ib",
               cpus_per_task=32, mem="200G", extra_sbatch=["--exclusive"], signal_lead_s=600,
               setup=["module load cuda/12.4", "source /shared/venv/bin/activate"])
    assert sbatch_directives(job) == [
        "--job-name=dino-pretrain-1a2b3c4d", "--nodes=2", "--ntasks-per-node=1",
        f"--output={job.job_dir}/slurm-%j.out", "--open-mode=append", "--requeue", "--signal=B:USR1@600",
        "--export=ALL", "--gpus-per-node=4", "--cpus-per-task=32", "--mem=200G", "--partition=gpu",
        "--account=vision", "--qos=high", "--time=24:00:00", "--constraint=a100&ib", "--exclusive"]
    script = render_batch_script(job, "flow-run-id", "mlflow-run-id")
    assert "s3cr3t-value" not in script and "AWS_SECRET" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # bash parses it
    lines = script.splitlines()
    assert lines.index("module load cuda/12.4") < next(i for i, line in enumerate(lines) if "srun " in line)
    srun = next(line for line in lines if "srun " in line).strip()
    assert srun.startswith("srun --kill-on-bad-exit=1 --nodes=2 --ntasks=2 --ntasks-per-node=1 "
                           f"--output={job.job_dir}/slurm-%j-task-%t.out --open-mode=append --cpus-per-task=32 "
                           "/venv/bin/python -m torch.distributed.run --nproc_per_node=4 --nnodes=2")
    assert '"--rdzv-endpoint=${DINO_RDZV_HOST}:${DINO_RDZV_PORT}" "--rdzv-id=${SLURM_JOB_ID}"' in srun
    assert srun.endswith(f"-m dino_model.train --config {job.job_dir}/config.json &")
    assert "trap 'on_signal time_limit USR1' USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "#SBATCH --gpus-per-node" not in render_batch_script(dataclasses.replace(job, gpus_per_node=0), "f", "r")
    spec = slurm_launch_spec(4, 2, job.settings)
    spec.validate()  # what the request's checks see before the job exists
    assert spec.rdzv_id == "<Slurm job id>"


def test_scontrol_and_sbatch_answers_are_read():
    fields = parse_show_job(SHOW_JOB + "\n")
    assert (fields["JobState"], fields["Restarts"], fields["NodeList"], fields["Comment"]) == (
        "FAILED", "1", "n[1-2]", "two words here")
    assert exit_code(fields) == (1, 0) and fields["Power"] == ""
    assert base_state("CANCELLED by 0") == "CANCELLED" and base_state("RUNNING+") == "RUNNING"
    assert parse_job_id("812\n") == "812" and parse_job_id("812;cluster-a") == "812"


def _log(tmp_path: Path, job_id: str, batch: list[str], tasks: dict[int, list[str]]) -> tuple[JobLog, Path]:
    """A job's log files as the job writes them, read back by a JobLog."""
    folder = tmp_path / "job"
    folder.mkdir(exist_ok=True)
    (folder / f"slurm-{job_id}.out").write_text("\n".join(batch) + "\n")
    for task, lines in tasks.items():
        (folder / f"slurm-{job_id}-task-{task}.out").write_text("\n".join(lines) + "\n")
    shown: list[str] = []
    log = JobLog(shown.append, lambda record: None)
    log.open(folder / f"slurm-{job_id}.out")
    log.flush()
    log.shown = shown
    return log, folder / f"slurm-{job_id}.out"


def _progress(event: str, **fields) -> str:
    return "DINO_PROGRESS " + json.dumps({"event": event, **fields})


def test_each_final_state_becomes_an_outcome_that_says_what_to_do(tmp_path):
    fields = parse_show_job(SHOW_JOB)
    started = [_progress("start", step=0, total_steps=100)]
    crash = started + ["Traceback (most recent call last):", "RuntimeError: CUDA error: an illegal memory access"]
    log, path = _log(tmp_path, "7", ["dino-slurm: start: job 7 restart 0", "srun: error: n2: task 1: Exited with "
                                     "exit code 1"], {0: ["[rank 1] setting up"], 1: crash})
    assert log.rank0_task == "1" and "task 0: [rank 1] setting up" in log.shown  # before rank 0 is known: every task
    with pytest.raises(SlurmJobFailed) as failed:
        job_outcome("7", fields, "FAILED", log, path)
    message = str(failed.value)
    assert message.startswith("Slurm job 7 (dino-pretrain-1a2b3c4d) FAILED (exit code 1): RuntimeError: CUDA error")
    assert "retries it (launch.retries) with a new job that resumes" in message and f"log: {path}" in message
    assert "srun: error: n2: task 1" in message and not isinstance(failed.value, SlurmJobNotRetried)
    expected = {"OUT_OF_MEMORY": "ran OUT_OF_MEMORY (a process on n[1-2] went over the job's memory, 2G): "
                                 "RuntimeError: CUDA error: an illegal memory access. Raise slurm.mem",
                "NODE_FAIL": "lost a node (NODE_FAIL on n[1-2])", "BOOT_FAIL": "could not boot its nodes",
                "TIMEOUT": "reached its time limit (TIMEOUT) before the trainers checkpointed and the job was "
                           "requeued: RuntimeError: CUDA error: an illegal memory access. Raise slurm.signal_lead_s"}
    for state, text in expected.items():
        with pytest.raises(SlurmJobFailed, match=text.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]").replace(".", r"\.")):
            job_outcome("7", {**fields, "JobState": state}, state, log, path)
    # someone else's scancel: not retried; a preemption Slurm did not requeue: submitted again (None)
    with pytest.raises(SlurmJobNotRetried, match="CANCELLED outside this flow run .* Not retried"):
        job_outcome("7", {**fields, "JobState": "CANCELLED"}, "CANCELLED", log, path)
    assert job_outcome("7", {**fields, "JobState": "PREEMPTED"}, "PREEMPTED", log, path) is None


def test_a_health_stop_is_neither_retried_nor_a_success(tmp_path):
    collapsed = [_progress("start", step=0), _progress("end", status="collapsed:uniform", step=40,
                                                       checkpoint="/ckpt/checkpoint-000000040.pt")]
    log, path = _log(tmp_path, "9", ["dino-slurm: trainers exited with code 1"], {0: collapsed})
    with pytest.raises(SlurmJobNotRetried, match=r"collapsed:uniform, train.health=stop\) at step 40") as stopped:
        job_outcome("9", {"JobState": "FAILED", "ExitCode": "1:0"}, "FAILED", log, path)
    assert not retry_slurm_failure(None, None, Failed(data=stopped.value))
    assert stopped.value.stop_reason == "collapsed:uniform"  # the MLflow run's, as the local launcher's
    # rank 0's end record lost: torchrun's summary of a worker that exited with the trainer's code 5 says it too
    log, path = _log(tmp_path, "10", [], {1: ["Failures:", "  exitcode  : 5 (pid: 4242)"]})
    with pytest.raises(SlurmJobNotRetried, match="collapsed"):
        job_outcome("10", {"JobState": "FAILED"}, "FAILED", log, path)
    assert retry_slurm_failure(None, None, Failed(data=SlurmJobFailed("a crash")))
    assert not retry_slurm_failure(None, None, Failed(data=UserInputError("bad input")))
    # a finished training is the task's result; COMPLETED without it is a failure
    done = [_progress("end", status="completed", step=100, total_steps=100)]
    log, path = _log(tmp_path, "11", [], {0: done})
    assert job_outcome("11", {"JobState": "COMPLETED"}, "COMPLETED", log, path)["step"] == 100
    log, path = _log(tmp_path, "12", [], {0: [_progress("end", status="terminated", step=3)]})
    with pytest.raises(SlurmJobFailed, match="COMPLETED but rank 0 reported no finished training"):
        job_outcome("12", {"JobState": "COMPLETED"}, "COMPLETED", log, path)


def test_the_log_is_read_as_it_grows_and_after_a_requeue(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    batch, task0 = folder / "slurm-5.out", folder / "slurm-5-task-0.out"
    shown, records = [], []
    log = JobLog(shown.append, records.append)
    log.open(batch)
    log.poll()  # nothing written yet
    batch.write_text("dino-slurm: start: job 5 restart 0\n")
    task0.write_text(_progress("start", step=0) + "\nepoch 1 · step 1/4 · loss 3.1\nhalf a li")
    log.poll()
    assert shown == ["dino-slurm: start: job 5 restart 0", "epoch 1 · step 1/4 · loss 3.1"]
    with open(task0, "a") as f:
        f.write("ne\n" + _progress("end", status="terminated", step=2) + "\n")
    with open(batch, "a") as f:
        f.write("dino-slurm: stop: time_limit (SIGUSR1) at 2026-12-07T05:00:00Z: the trainers checkpoint and stop\n"
                "dino-slurm: requeue: time_limit (the trainers ended: terminated)\n")
    log.poll()
    assert "half a line" in shown and (log.stop_reason, log.requeued) == ("time_limit", True)
    assert log.end_record["status"] == "terminated" and [r["event"] for r in records] == ["start", "end"]
    assert log.requeue_reason() == "time_limit"
    log.new_run()
    assert (log.stop_reason, log.requeued, log.end_record) == (None, False, None)
    # a preemption: Slurm ends the run (slurmstepd's notice in the batch log) and requeues it; the trap's own stop
    # ("stopped", on SIGTERM) is not why
    with open(batch, "a") as f:
        f.write("slurmstepd-n1: error: *** JOB 5 ON n1 CANCELLED AT 2026-12-07T05:59:55 DUE TO PREEMPTION ***\n"
                "dino-slurm: stop: stopped (SIGTERM) at 2026-12-07T05:59:55Z: the trainers checkpoint and stop\n")
    log.poll()
    assert (log.stop_reason, log.slurm_reason, log.requeue_reason()) == ("stopped", "preempted", "preempted")
    log.new_run()
    assert log.requeue_reason() == "requeued"  # nothing says why: an administrator's scontrol requeue


def test_dino_pretrain_checks_the_slurm_options_before_starting_anything(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = ["pretrain", str(tmp_path / "data"), str(tmp_path / "ckpt"), "--launcher", "slurm"]
    assert_user_error(args + ["--slurm-time", "tomorrow"], cwd, "--slurm-time: not a Slurm time limit")
    assert_user_error(args + ["--slurm-sbatch=--output=/tmp/x"], cwd, "--slurm-sbatch: ", "--output is set by the "
                      "launcher")
    assert_user_error(args[:3] + ["--slurm-partition", "gpu"], cwd, "--slurm-* options need --launcher slurm")
