"""The trainer never outlives its launcher: the parent-death signal (dino_model/parent_death.py), the launcher's
stop path (tasks/pretrain/trainer_process.py: one SIGTERM forwarded, the trainer checkpoints, then the signal's own handler),
and, end to end, a real torchrun trainer whose launcher is SIGKILLed mid-training: it checkpoints and exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from dino_model.checkpoint import list_checkpoints
from dino_model.metrics import parse_progress_line
from tests.test_train import subprocess_env, tiny_images, tiny_overrides  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` runs (zombies count as gone); return those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def test_a_child_gets_its_parent_death_signal_even_after_sigkill(tmp_path):
    """A parent (started in its own session) starts a child that asks for SIGTERM on its parent's death and writes
    a file when it gets it; the parent is SIGKILLed; the child reacts at once."""
    marker = tmp_path / "child-got-sigterm"
    child = textwrap.dedent(f"""
        import signal, sys, time
        from dino_model.parent_death import exit_with_parent
        def on_term(*_):
            open({str(marker)!r}, "w").write("ok")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        assert exit_with_parent(signal.SIGTERM)
        print("ready", flush=True)
        time.sleep(120)
    """)
    parent = textwrap.dedent(f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE, text=True)
        print(child.pid, child.stdout.readline().strip(), flush=True)
        child.wait()
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        child_pid, ready = proc.stdout.readline().split()
        assert ready == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert _wait_gone([int(child_pid)], timeout=30) == []
        assert marker.read_text() == "ok"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_dead_reader_costs_no_write(tmp_path):
    """Once the pipe's reader is gone, prints and log lines are dropped instead of raising BrokenPipeError."""
    script = textwrap.dedent("""
        import logging, sys, time
        from dino_model.parent_death import drop_output_without_reader
        drop_output_without_reader()
        logging.basicConfig(stream=sys.stderr)
        time.sleep(1.0)              # the reader closes its end meanwhile
        for _ in range(1000):
            print("x" * 100)
            logging.getLogger("t").warning("y" * 100)
        sys.stdout.flush()
        open(sys.argv[1], "w").write("survived")
    """)
    marker = tmp_path / "done"
    proc = subprocess.Popen([sys.executable, "-c", script, str(marker)], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc.stdout.close()
    assert proc.wait(60) == 0
    assert marker.read_text() == "survived"


#: A trainer that stops as the real one does, in steps the test orders by state, not by time: once started it sends
#: the signal named by its second argument to its launcher's process group (it is in a session of its own, so
#: not to itself), as a user's Ctrl-C or a service manager's stop finds the launcher; on its first SIGTERM it
#: reports ``stopping`` ("finishing the step, writing the checkpoint") and waits until the file named by its first
#: argument exists; then it reports its end (with the number of SIGTERMs it got) and exits 143.
STAND_IN_TRAINER = textwrap.dedent("""
    import json, os, signal, sys, time
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    def progress(**record):
        print("DINO_PROGRESS " + json.dumps(record), flush=True)
    progress(event="start", pid=os.getpid())
    os.killpg(os.getpgid(os.getppid()), getattr(signal, sys.argv[2]))
    while not got:
        time.sleep(0.05)
    progress(event="stopping", signals=len(got))
    deadline = time.monotonic() + 60        # a bound against a broken test, never reached when it works
    while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    progress(event="end", status="terminated", step=7, signals=len(got))
    sys.exit(143)
""")


@pytest.mark.parametrize("signals, outcome", [
    # SIGTERM that nothing else handles, sent twice to the launcher's whole group: the child (in its own session)
    # gets exactly one, ends with its record, and the launcher raises TrainerStopped (never a retried failure).
    (["SIGTERM", "SIGTERM"], "TrainerStopped [(15, 1, 7)]"),
    # Ctrl-C: the same, then KeyboardInterrupt goes on.
    (["SIGINT"], "KeyboardInterrupt [(2, 1, 7)]"),
    # Ctrl-C twice: the second abandons the checkpoint; the child is killed before its record.
    (["SIGINT", "SIGINT"], "KeyboardInterrupt [(2, None, None)]"),
])
def test_a_stop_request_stops_the_child_once_then_takes_its_course(signals, outcome, tmp_path):
    """The first signal goes to the launcher's group once the child has started (sent by the child, while the
    launcher follows its output, as a real signal finds it; no thread of the launcher's sends it, so no signal
    lands while the launcher is starting a thread); the second one once the child reports that it is
    stopping, i.e. while the launcher follows the stop, from the launcher's own thread: delivered to this process
    before ``os.killpg`` returns and handled before the next line runs, so it is handled before the child is let
    go (by the release file) and whatever the machine's speed."""
    release = tmp_path / "release"
    script = textwrap.dedent(f"""
        import os, pathlib, signal, sys
        from tasks.pretrain.trainer_process import run_trainer, TrainerFailed, TrainerStopped
        # Ctrl-C raises KeyboardInterrupt, as in a terminal, even when the suite runs in the background (a
        # non-interactive shell's `make test &` ignores SIGINT, and every child inherits that).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signals = {signals!r}
        stopped = []
        def on_progress(r):
            if r["event"] == "stopping":
                for name in signals[1:]:
                    os.killpg(0, getattr(signal, name))
                pathlib.Path({str(release)!r}).touch()
        def on_stop(signum, end):
            stopped.append((signum, (end or {{}}).get("signals"), (end or {{}}).get("step")))
        try:
            run_trainer([sys.executable, "-c", {STAND_IN_TRAINER!r}, {str(release)!r}, signals[0]], {{}}, on_line=print,
                        on_progress=on_progress, on_stop=on_stop)
        except (KeyboardInterrupt, TrainerStopped) as e:
            print(type(e).__name__, stopped)
        except TrainerFailed as e:
            print("TrainerFailed", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120, start_new_session=True)
    assert done.stdout.strip().splitlines()[-1] == outcome, done.stdout + done.stderr


@pytest.mark.slow
def test_a_sigkilled_launcher_leaves_no_trainer_running(tiny_images, tmp_path):
    """The launcher (run_trainer around a real torchrun trainer) is SIGKILLed mid-training: torchrun gets SIGTERM
    from the kernel, the trainer finishes its step, writes a checkpoint and exits; nothing is left running."""
    ckpt = tmp_path / "ckpt"
    overrides = tiny_overrides(tiny_images, ckpt, **{"train.epochs": 50, "checkpoint.every_n_steps": 0,
                                                     "checkpoint.every_n_epochs": 50})
    launcher = textwrap.dedent("""
        import json, sys
        from tasks.pretrain.trainer_process import LaunchSpec, run_trainer, torchrun_command
        cmd = torchrun_command(LaunchSpec(nproc_per_node=1), None, sys.argv[1:])
        run_trainer(cmd, {}, on_line=lambda line: None,
                    on_progress=lambda r: print("DINO_PROGRESS " + json.dumps(r), flush=True))
    """)
    proc = subprocess.Popen([sys.executable, "-c", launcher, *overrides], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            record = parse_progress_line(line) or {}
            if record.get("event") == "step" and record["step"] >= 2:
                break
            assert time.monotonic() < deadline, "the trainer made no progress"
        else:
            pytest.fail("the launcher ended before the trainer reached step 2")
        tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 2, tree  # torchrun and its worker
        assert not list_checkpoints(str(ckpt))
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(30)
        left = _wait_gone(tree, timeout=300)
        gone_after = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert left == [], f"still running after the launcher died: {left}"
    print(f"\ntrainer tree gone {gone_after:.1f} s after the launcher's SIGKILL")
    steps = [s for s, _ in list_checkpoints(str(ckpt))]
    assert len(steps) == 1 and steps[0] >= 2, steps  # the stop checkpoint, at the step it had reached
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")]
