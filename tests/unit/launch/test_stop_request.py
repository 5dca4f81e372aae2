"""The local launcher's stop handler (``launch.experiment.StopRequest``), on real child processes that stand in for
a stage job's ranks (their command line names ``megatron_s2d.stages.entry`` as a job's does): the first signal
SIGTERMs the ranks (a stage saves and exits 75), a rank still starting gets it once it appears, a second signal kills
the job's process trees (only those). The whole path (launcher -> NeMo-Run -> stage) runs in tests/functional/test_run_folder_drift.py."""

import signal
import subprocess
import sys
import time

from megatron_s2d.launch.experiment import LaunchStopped, StopRequest, _job_processes

RANK = ("import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n")


def _rank(ignore_term: bool = False) -> subprocess.Popen:
    code = RANK.replace("lambda *a: sys.exit(75)", "signal.SIG_IGN") if ignore_term else RANK
    p = subprocess.Popen([sys.executable, "-c", code, "-m", "megatron_s2d.stages.entry", "--stage", "x"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_first_signal_terminates_the_ranks_second_kills():
    ranks = [_rank(), _rank()]
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a reward worker, say
    try:
        assert sorted(p.pid for p in _job_processes()) == sorted(p.pid for p in ranks)
        stop = StopRequest("teacher_rl")
        stop(signal.SIGTERM)
        assert [p.wait(timeout=30) for p in ranks] == [75, 75] and stop.signum == signal.SIGTERM
        assert helper.poll() is None  # only the job's ranks get the stop
        stubborn = _rank(ignore_term=True)
        stop(signal.SIGINT)  # a second signal: the job's process trees are killed, nothing else
        assert stubborn.wait(timeout=30) == -signal.SIGKILL and stop.killed
        assert helper.poll() is None
    finally:
        for p in ranks + [helper]:
            p.kill()


def test_a_rank_still_starting_is_stopped_when_it_appears():
    stop = StopRequest("opd")
    stop(signal.SIGHUP)  # no rank yet
    time.sleep(0.5)
    late = _rank()
    assert late.wait(timeout=30) == 75


def test_launch_stopped_exit_code_is_128_plus_the_signal(tmp_path):
    from megatron_s2d.stages.layout import RunLayout

    stop = StopRequest("teacher_rl")
    stop.signum = signal.SIGINT
    e = LaunchStopped(stop.message(RunLayout.of(tmp_path)), stop.signum)
    assert e.exit_code == 130 and "stopped by SIGINT" in str(e) and "no checkpoint yet" in str(e)
