"""One stop flag (`utils.runtime.StopFlag`) serves training, AutoAttack and the job runner."""
import os
import signal
import threading

from utils.runtime import STOP_SIGNALS, StopFlag, stop_on_signals
from utils.tools import jobs


def test_installed_inside_the_block_only_and_then_runs_in_the_handler():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    seen = []
    with StopFlag(STOP_SIGNALS, then=seen.append).installed() as flag:
        assert all(signal.getsignal(s) is flag for s in STOP_SIGNALS)
        os.kill(os.getpid(), signal.SIGUSR1)
    assert flag.signum == signal.SIGUSR1 and seen == [signal.SIGUSR1]
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_outside_the_main_thread_nothing_is_installed():
    errors = []

    def worker():
        try:
            with StopFlag(STOP_SIGNALS).installed():
                pass
        except Exception as e:  # noqa: BLE001 - signal.signal raises ValueError off the main thread
            errors.append(e)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not errors


def test_autoattack_and_the_job_runner_install_the_stop_flag():
    for block in (stop_on_signals(), jobs.Runner()._signals()):
        with block:
            assert all(isinstance(signal.getsignal(s), StopFlag) for s in STOP_SIGNALS)
