"""utils/tools/jobs.py: the job runner of the sweep and the study (fake stages: small bash commands)."""
import os
import signal
import subprocess
import sys
import time

from conftest import started_until
from utils.lock import hold
from utils.tools.jobs import Job, Reporter, Runner, Stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step(folder, name, rc=0):
    """A stage that appends `name gpu=...` to folder/ran.txt, then makes folder/name (its result) unless rc != 0."""
    script = (f'echo "{name} gpu=${{CUDA_VISIBLE_DEVICES:-none}}" >> {folder}/ran.txt; [ {rc} = 0 ] || exit {rc}; '
              f'touch {folder}/{name}; echo output of {name}')
    return Stage(name, ["bash", "-c", script], done=lambda: os.path.exists(os.path.join(folder, name)))


def ran(folder):
    path = os.path.join(folder, "ran.txt")
    return open(path).read().split("\n")[:-1] if os.path.exists(path) else []


class Said(Reporter):
    def __init__(self):
        self.lines = []

    def skip(self, job, stage, out):
        self.lines.append(f"skip {job.name} {stage.name}")

    def start(self, job, stage, earlier, out):
        self.lines.append(f"start {job.name} {stage.name} after {','.join(earlier) or '-'}")


def test_stages_run_in_order_stop_at_a_failure_and_a_rerun_continues(tmp_path):
    flag = tmp_path / "fail"
    flag.write_text("")
    fails = Stage("b", ["bash", "-c", f"echo b >> {tmp_path}/ran.txt; [ ! -e {flag} ] || exit 3; touch {tmp_path}/b"],
                  done=lambda: (tmp_path / "b").exists())
    job = Job("j", str(tmp_path), [step(tmp_path, "a"), fails, step(tmp_path, "c")], collect=lambda: "result")
    first = Runner().run([job])[0]
    assert (first.rc, first.stage, first.result, first.interrupted) == (3, "b", None, False)
    assert ran(tmp_path) == ["a gpu=none", "b"]
    flag.unlink()
    said = Said()
    second = Runner(reporter=said).run([job])[0]
    assert (second.rc, second.result, second.ran) == (0, "result", ["b", "c"])
    assert ran(tmp_path) == ["a gpu=none", "b", "b", "c gpu=none"]  # a was done: skipped
    assert said.lines == ["skip j a", "start j b after -", "start j c after b"]
    third = Runner().run([job])[0]
    assert third.rc == 0 and third.ran == [] and len(ran(tmp_path)) == 4


def test_a_finished_job_runs_nothing_and_is_collected(tmp_path):
    job = Job("j", str(tmp_path), [step(tmp_path, "a")], done=lambda: True, collect=lambda: 7)
    o = Runner().run([job])[0]
    assert (o.rc, o.skipped, o.result) == (0, True, 7) and ran(tmp_path) == []


def test_dry_run_runs_nothing_and_a_stage_that_needs_one_to_run_is_not_done(tmp_path):
    (tmp_path / "b").write_text("")  # b's result is there, but b needs a, which would run first: b is stale
    (tmp_path / "c").write_text("")  # c's result is there and c does not need a
    said = Said()
    b, c = step(tmp_path, "b"), step(tmp_path, "c")
    b.needs = ("a",)
    job = Job("j", str(tmp_path), [step(tmp_path, "a"), b, c], log=str(tmp_path / "logs" / "j.log"), lock="job",
              collect=lambda: 1 / 0)
    o = Runner(dry_run=True, reporter=said).run([job])[0]
    assert o.rc == 0 and o.ran == ["a", "b"] and o.result is None
    assert said.lines == ["start j a after -", "start j b after a", "skip j c"]
    assert sorted(os.listdir(tmp_path)) == ["b", "c"]  # no log, no lock, no result


def test_one_job_per_gpu_with_its_log(tmp_path):
    jobs = []
    for i in range(4):
        folder = tmp_path / f"job{i}"
        folder.mkdir()
        slow = Stage("slow", ["bash", "-c", "sleep 0.3"], done=lambda f=folder: (f / "a").exists())
        jobs.append(Job(f"job{i}", str(folder), [slow, step(folder, "a"), step(folder, "b")],
                        log=str(tmp_path / "logs" / f"job{i}.log")))
    outcomes = Runner(gpus=[0, 1]).run(jobs)
    assert [o.rc for o in outcomes] == [0] * 4 and [o.job.name for o in outcomes] == [j.name for j in jobs]
    assert {o.slot for o in outcomes} == {"0", "1"}
    for o in outcomes:  # every stage of a job on the GPU it holds, its output in its own log
        assert ran(o.job.folder) == [f"a gpu={o.slot}", f"b gpu={o.slot}"]
        assert open(o.job.log).read() == "output of a\noutput of b\n"


def test_a_locked_folder_refuses_the_job(tmp_path):
    job = Job("j", str(tmp_path), [step(tmp_path, "a")], lock="test job")
    with hold(str(tmp_path), "other"):
        o = Runner().run([job])[0]
    assert o.rc == 2 and "pid" in o.message and ran(tmp_path) == []
    assert Runner().run([job])[0].rc == 0


RUN_TWO = """
import sys
from utils.tools.jobs import Job, Runner, Stage
folder, handle = sys.argv[1], sys.argv[2] == "handle"
trap = "trap 'echo term >> {f}/ran.txt; exit 75' TERM; " if handle else ""
wait = Stage("wait", ["bash", "-c", trap.format(f=folder) + f"touch {folder}/ready; for i in $(seq 300); do sleep 0.1; done"])
later = Stage("later", ["bash", "-c", f"echo later >> {folder}/ran.txt"])
outcomes = Runner().run([Job("first", folder, [wait, later]), Job("second", folder, [later])])
print([(o.rc, o.interrupted) if o else None for o in outcomes])
"""


def test_sigterm_reaches_the_child_and_nothing_more_starts(tmp_path):
    for how in ("handle", "die"):
        (tmp_path / "ready").unlink(missing_ok=True)
        (tmp_path / "ran.txt").unlink(missing_ok=True)
        p = started_until([sys.executable, "-c", RUN_TWO, str(tmp_path), how], tmp_path / "ready",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        if how == "handle":  # the child checkpointed (75): interrupted; no later stage, no second job
            assert out.strip() == "[(75, True), None]" and ran(tmp_path) == ["term"]
        else:  # killed by the forwarded SIGTERM (143): interrupted as well
            assert out.strip() == "[(143, True), None]" and ran(tmp_path) == []


def test_the_child_dies_with_a_killed_runner(tmp_path):
    p = started_until([sys.executable, "-c", RUN_TWO, str(tmp_path), "die"], tmp_path / "ready",
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = _child_of(p.pid)
    p.kill()
    p.wait()
    for _ in range(100):
        if not os.path.exists(f"/proc/{child}") or "Z" in _state(child):
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived the runner")


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _child_of(parent):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                    return int(pid)
        except (OSError, ValueError, IndexError):
            continue
    raise AssertionError("no child")


def test_a_stage_that_checkpointed_and_stopped_stops_the_runner(tmp_path):
    """Exit 75 (a run that got SLURM's signal itself): interrupted, and the next job does not start."""
    stopped = Stage("train", ["bash", "-c", "exit 75"])
    outcomes = Runner().run([Job("first", str(tmp_path), [stopped]), Job("second", str(tmp_path), [step(tmp_path, "a")])])
    assert outcomes[0].rc == 75 and outcomes[0].interrupted and outcomes[1] is None and ran(tmp_path) == []


def test_a_bug_in_a_job_reaches_the_caller_with_jobs_in_parallel(tmp_path):
    def broken():
        raise ValueError("a bug in collect")
    jobs = [Job(f"j{i}", str(tmp_path), [], collect=broken) for i in range(2)]
    try:
        Runner(parallel=2).run(jobs)
    except ValueError as e:
        assert "a bug in collect" in str(e)
    else:
        raise AssertionError("the bug was swallowed")


def test_lines_of_parallel_jobs_never_interleave(tmp_path, capsys):
    class Slow(Reporter):
        def job_end(self, outcome):
            for word in ("one", "two", "three"):
                print(word, end=" ", flush=True)
                time.sleep(0.01)
            print()

    Runner(parallel=4, reporter=Slow()).run([Job(f"j{i}", str(tmp_path), []) for i in range(4)])
    assert capsys.readouterr().out.splitlines() == ["one two three "] * 4


def test_a_signal_that_comes_while_a_child_starts_reaches_it(tmp_path, monkeypatch):
    """The signal arrives after Popen returned and before the runner registered the child: it still gets it."""
    from utils.tools import jobs
    runner = Runner()
    popen = jobs.subprocess.Popen

    def started_then_signalled(*args, **kw):
        child = popen(*args, **kw)
        runner._forward(signal.SIGTERM, None)
        return child
    monkeypatch.setattr(jobs.subprocess, "Popen", started_then_signalled)
    trap = f"trap 'echo term >> {tmp_path}/ran.txt; exit 75' TERM; for i in $(seq 100); do sleep 0.1; done"
    t0 = time.time()
    o = runner.run([Job("j", str(tmp_path), [Stage("wait", ["bash", "-c", trap]), step(tmp_path, "later")])])[0]
    # the child got it: "wait" ended at once, by its trap (75) or killed before bash set the trap (143)
    assert o.interrupted and o.stage == "wait" and (o.rc, ran(tmp_path)) in ((75, ["term"]), (143, []))
    assert time.time() - t0 < 8
