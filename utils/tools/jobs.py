"""One job pipeline for the sweep and the study: a run's jobs (train, evaluate, AutoAttack), the one rule for
"done", the manifest that lists them, and the runner that launches, resumes, skips what is finished and collects.

A run's pipeline (`Pipeline`, one manifest line) is three commands: training with `--resume auto`, then the
`--evaluate` of its model_best and AutoAttack of it. A step is done when its settings, its status and its result
agree (`current`): training when its run folder says finished (its settings are the folder's args.yaml, which
`--resume auto` holds the command to); the evaluation and AutoAttack when their result is not older than
model_best, the evaluation's folder says finished, and the command recorded after the step succeeded is the one
asked for now (so changing a setting reruns the step).

A job is a folder and an ordered list of stages. A stage is a command line and a predicate that says its result
is already there; the runner skips such a stage, so running the same jobs again continues where they stopped
(each training command carries `--resume auto`, which itself resumes a partial run). `Runner.run(jobs)` runs
`parallel` jobs at a time (one GPU each when `gpus` is given: CUDA_VISIBLE_DEVICES is set for every stage of the
job), each job's stages in order, and returns one `Outcome` per job in the order given.

Children never outlive the runner: SIGTERM/SIGINT received by the runner are passed on as SIGTERM and SIGUSR1 as
SIGUSR1 (the entry scripts then checkpoint and exit 75), and each child gets SIGTERM from the kernel when the
runner dies, even by kill -9 (Linux PR_SET_PDEATHSIG). After a signal, or when a stage exits 75, no further job
starts and the outcome is `interrupted`: run the same command again to continue.

    jobs = [Job("run0", folder, [Stage("train", [sys.executable, "train_ori.py", ...], done=finished)])]
    outcomes = Runner(parallel=2).run(jobs)
"""
import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import UsageError, read_text_lines
from ..lock import hold
from ..runfiles import run_state
from ..writes import open_append, write_text_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUEUE_EXIT = 75  # the entry scripts' exit status after a SIGTERM/SIGUSR1 checkpoint: run again later


def _never() -> bool:
    return False


@dataclass
class Stage:
    """One command of a job. `done()` says its result is already there (the stage is skipped); `after()` runs
    when the command succeeded (e.g. to record which command made the result). `needs` names earlier stages whose
    output this one reads: in a dry run, when one of them would run, this one counts as not done."""
    name: str
    argv: list
    done: Callable[[], bool] = _never
    after: Optional[Callable[[], None]] = None
    needs: tuple = ()

    def shown(self) -> str:
        return shlex.join(map(str, self.argv))


@dataclass
class Job:
    """A folder and its stages, run in order.

    done: the whole job is finished (no stage runs; `collect` gives its result).
    lock: hold the folder's lock (utils.lock.hold) while the job runs; the text names the holder's kind.
    prepare: runs first (under the lock); a UsageError fails the job with its message.
    collect: the job's result once every stage is done.
    log: a file that receives the stages' output and the job's messages (None: the runner's stdout).
    """
    name: str
    folder: str
    stages: list
    done: Callable[[], bool] = _never
    lock: str = ""
    prepare: Optional[Callable[[], None]] = None
    collect: Optional[Callable[[], object]] = None
    log: Optional[str] = None
    env: dict = field(default_factory=dict)


@dataclass
class Outcome:
    """What became of a job: rc 0 (done), the failing stage's exit status, 2 for a refused job (UsageError),
    75 interrupted. `ran` names the stages that ran (or would run, in a dry run)."""
    job: Job
    rc: int = 0
    stage: str = ""
    message: str = ""
    result: object = None
    skipped: bool = False
    interrupted: bool = False
    ran: list = field(default_factory=list)
    slot: Optional[str] = None


class Reporter:
    """What the runner says; the default says nothing. `out` is the job's stream (its log or stdout)."""

    def skip(self, job, stage, out):
        pass

    def start(self, job, stage, earlier, out):
        """`stage` runs (or would run, in a dry run); `earlier`: the names of this job's stages that ran before."""

    def failed(self, job, stage, rc, out):
        pass

    def job_start(self, job, slot):
        pass

    def job_end(self, outcome):
        pass


# ---------------------------------------------------------------------------------------------------------
# A run's pipeline, the rule for "done", the manifest
# ---------------------------------------------------------------------------------------------------------

# The files that record which command made a step's result (written after it succeeded); named as the sweep first
# wrote them, so lines finished before stay done.
RECORDS = {"eval": ".sweep_eval_command", "autoattack": ".sweep_autoattack_command"}
MANIFEST_HEADER = "#run_dir\teval_dir\tcommand\teval_command\tautoattack_command"


def current(result, command="", record="", status="", source="") -> bool:
    """The one rule for "done": `result` exists and is not older than `source` (the checkpoint it was made of),
    the run folder `status` (when given) says finished, and the file `record` (when given) holds `command`, the
    settings asked for now."""
    try:
        if source and os.stat(result).st_mtime_ns < os.stat(source).st_mtime_ns:
            return False
        if not os.path.exists(result) or (status and run_state(status) != "finished"):
            return False
        if record:
            with open(record, encoding="utf-8") as f:
                return f.read().rstrip("\n") == command
        return True
    except OSError:
        return False


@dataclass
class Pipeline:
    """One run's jobs: `train` (its run folder `run_dir`), then `eval` (the `--evaluate` of model_best, into the run
    folder `eval_dir`) and `aa` (AutoAttack of model_best, writing `aa_out`). Commands are shell-quoted text, as a
    manifest line holds them ('-': the step is left out). `records`: the folder of the command records (default
    `run_dir`)."""
    run_dir: str
    eval_dir: str
    train: str
    eval: str = "-"
    aa: str = "-"
    aa_out: str = ""
    records: str = ""

    def __post_init__(self):
        self.aa_out = self.aa_out or os.path.join(self.run_dir, "autoattack.json")
        self.records = self.records or self.run_dir

    @property
    def name(self) -> str:
        return os.path.basename(self.run_dir)

    @property
    def best(self) -> str:
        return os.path.join(self.run_dir, "checkpoint", "model_best.pth.tar")

    def step_done(self, step) -> bool:
        """Whether `step` (train, eval, autoattack) has its current result; a later step only after training."""
        trained = run_state(self.run_dir) == "finished"
        if step == "train" or not trained:
            return trained
        record = os.path.join(self.records, RECORDS[step])
        if step == "eval":
            return current(os.path.join(self.eval_dir, "metrics.jsonl"), self.eval, record, self.eval_dir, self.best)
        return current(self.aa_out, self.aa, record, source=self.best)

    def steps(self) -> list:
        return [("train", self.train), ("eval", self.eval), ("autoattack", self.aa)]

    def done(self) -> bool:
        """Every step of the run that is not left out has its current result."""
        return all(self.step_done(step) for step, command in self.steps() if command != "-")

    def job(self, name, folder="", **kw) -> "Job":
        """The run as a job of the runner (kw: Job's lock, log, prepare, done, collect, env): training resumes
        (`--resume auto`), each later step records its command once it succeeded."""
        stages = [Stage("train", shlex.split(self.train) + ["--resume", "auto"], done=lambda: self.step_done("train"))]
        for step, command in self.steps()[1:]:
            if command != "-":
                stages.append(Stage(step, shlex.split(command), done=lambda step=step: self.step_done(step),
                                    needs=("train",), after=self._record(step, command)))
        return Job(name, folder or self.run_dir, stages, **kw)

    def _record(self, step, command):
        return lambda: write_text_atomic(os.path.join(self.records, RECORDS[step]), command + "\n")


def training_args(argv, script, what):
    """`argv`, an entry script's flags, read by `script`'s own parser (its defaults filled in); UsageError naming
    `what` when the parser refuses them (argparse's own message then stands above)."""
    from args import parse_args
    try:
        return parse_args(list(argv), script=script)
    except UsageError as e:
        raise UsageError(f"{what} is rejected by {script}.py: {e}") from None
    except SystemExit:
        raise UsageError(f"{what} is rejected by {script}.py (message above)") from None


def run_folders(argv, script, what) -> tuple:
    """(training run folder, `--evaluate` run folder) of `script` run with `argv`, as the entry scripts name them
    (utils.runlog.run_dir): the jobs and the runs cannot disagree on names."""
    from ..runlog import run_dir
    args = training_args(argv, script, what)
    return os.path.abspath(run_dir(args, script)), os.path.abspath(run_dir(args, script, evaluate=True))


def write_manifest(path, pipelines):
    """The manifest: a header, then one line per run (run_dir, eval_dir and the three commands, tab-separated)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, MANIFEST_HEADER + "\n" + "".join(
        "\t".join([x.run_dir, x.eval_dir, x.train, x.eval, x.aa]) + "\n" for x in pipelines))


def read_manifest(path) -> list:
    """The Pipelines of a manifest ('#' lines are comments); UsageError for a line that is not one."""
    lines = []
    for n, text in enumerate(read_text_lines(path, f"manifest {path} is {{why}}"), 1):
        if text.startswith("#") or not text.strip():
            continue
        fields = text.rstrip("\n").split("\t")
        if len(fields) != 5:
            raise UsageError(f"{path} line {n} has {len(fields)} fields, not 5: not a sweep manifest")
        lines.append(Pipeline(*fields))
    return lines


# ---------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------

def _die_with_parent():
    """In a child (preexec): SIGTERM it when the runner dies, even by kill -9; ignore SIGINT (a terminal's Ctrl-C
    reaches the runner, which passes it on as SIGTERM, so the child hears of it once)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != _PARENT:  # the runner died before the prctl took hold
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


try:  # looked up once here: the preexec function must not import or allocate much
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None
_PARENT = os.getpid()


def exit_status(returncode: int) -> int:
    """A shell's exit status: a child killed by signal S is 128 + S."""
    return 128 - returncode if returncode < 0 else returncode


class Runner:
    """Runs jobs; see the module's docstring.

    parallel: jobs at a time (ignored when `gpus` is given: one job per GPU).
    gpus: device indexes; each job runs with CUDA_VISIBLE_DEVICES set to the one it holds.
    env: added to every child's environment (e.g. OMP_NUM_THREADS=1).
    dry_run: report what would run, run nothing (a stage that needs one that would run counts as not done).
    """

    def __init__(self, parallel=1, gpus=None, env=None, cwd=ROOT, dry_run=False, reporter=None):
        self.slots = [str(g) for g in gpus] if gpus else [None] * max(1, parallel)
        self.env = dict(env or {})
        self.cwd = cwd
        self.dry_run = dry_run
        self.reporter = reporter or Reporter()
        self.signalled = False
        self._stop = threading.Event()
        self._children = {}  # running child -> how many of `_passed` it has been sent
        self._passed = []  # the signals passed on so far, in order
        self._lock = threading.RLock()  # the signal handler may run while the main thread holds it
        self._saying = threading.Lock()  # job_start and job_end lines of parallel jobs never interleave

    # ---- signals -----------------------------------------------------------------------------------------
    def _forward(self, signum, frame):
        self.signalled = True
        self._stop.set()
        with self._lock:
            self._passed.append(signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM)
            for child in list(self._children):
                self._pass_on(child)

    def _pass_on(self, child):
        """Under `_lock`: send `child` the signals passed on since it last got one, so a child started just as
        a signal came gets it too (before, a SIGTERM between Popen and the child's registration was lost)."""
        end, start = len(self._passed), self._children.get(child, 0)
        self._children[child] = end
        for sent in self._passed[start:end]:
            with contextlib.suppress(OSError):
                child.send_signal(sent)

    def _signals(self):
        """While the runner runs: SIGTERM, SIGINT and SIGUSR1 passed on to the children (main thread only)."""
        from ..runtime import STOP_SIGNALS, StopFlag  # here: the manifest and the pipeline import no torch
        return StopFlag(STOP_SIGNALS, then=lambda signum: self._forward(signum, None)).installed()

    # ---- running -----------------------------------------------------------------------------------------
    def run(self, jobs) -> list:
        """One Outcome per job, in the order of `jobs` (None for a job never started after an interruption)."""
        jobs = list(jobs)
        outcomes = [None] * len(jobs)
        queue = iter(enumerate(jobs))
        take = threading.Lock()
        bugs = []

        def worker(slot):
            while not self._stop.is_set():
                with take:
                    item = next(queue, None)
                if item is None:
                    return
                i, job = item
                try:
                    outcomes[i] = self.run_job(job, slot)
                except Exception as e:  # a bug: raised again in the caller's thread, once the others stopped
                    bugs.append(e)
                    self._stop.set()
                    return
                if outcomes[i].interrupted:
                    self._stop.set()

        with self._signals():
            if len(self.slots) == 1:
                worker(self.slots[0])
            else:
                threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in self.slots]
                for t in threads:
                    t.start()
                for t in threads:
                    while t.is_alive():
                        t.join(0.2)  # the main thread stays free to take signals
        if bugs:
            raise bugs[0]
        return outcomes

    def run_job(self, job, slot=None) -> Outcome:
        """Run one job's stages in order (skipping the done ones) on `slot` (a GPU index or None)."""
        with self._saying:
            self.reporter.job_start(job, slot)
        outcome = Outcome(job, slot=slot)
        with contextlib.ExitStack() as stack:
            try:
                if job.lock and not self.dry_run:
                    stack.enter_context(hold(job.folder, job.lock))
                out = sys.stdout
                if job.log and not self.dry_run:
                    os.makedirs(os.path.dirname(os.path.abspath(job.log)), exist_ok=True)
                    out = stack.enter_context(open_append(job.log))
                if job.prepare is not None and not self.dry_run:
                    job.prepare()
                self._stages(job, slot, out, outcome)
                if outcome.rc == 0 and job.collect is not None and not self.dry_run:
                    outcome.result = job.collect()
            except UsageError as e:
                outcome.rc, outcome.message = 2, str(e)
        outcome.interrupted = outcome.rc == REQUEUE_EXIT or self.signalled
        with self._saying:
            self.reporter.job_end(outcome)
        return outcome

    def _stages(self, job, slot, out, outcome):
        if job.done():
            outcome.skipped = True
            return
        for stage in job.stages:
            stale = self.dry_run and any(name in outcome.ran for name in stage.needs)
            if not stale and stage.done():
                self.reporter.skip(job, stage, out)
                continue
            self.reporter.start(job, stage, list(outcome.ran), out)
            outcome.ran.append(stage.name)
            if self.dry_run:
                continue
            rc = self.call(stage.argv, out, {**job.env, **({"CUDA_VISIBLE_DEVICES": slot} if slot else {})})
            if rc != 0:
                self.reporter.failed(job, stage, rc, out)
                outcome.rc, outcome.stage = rc, stage.name
                outcome.message = f"{stage.name} exited with status {rc}"
                return
            if stage.after is not None:
                stage.after()

    def call(self, argv, out, env=None) -> int:
        """Run `argv` in `cwd` with its output on `out`; its exit status (128 + S when killed by signal S)."""
        if self._stop.is_set() and self.signalled:
            return REQUEUE_EXIT  # a signal came between two stages: start nothing more
        out.flush()
        sys.stdout.flush()
        stream = None if out is sys.stdout else out  # stdout: the child inherits ours
        child = subprocess.Popen([str(a) for a in argv], cwd=self.cwd, stdout=stream,
                                 stderr=None if stream is None else subprocess.STDOUT,
                                 preexec_fn=_die_with_parent, env={**os.environ, **self.env, **(env or {})})
        with self._lock:
            self._pass_on(child)  # a signal that came while it started is not lost
        try:
            while True:
                try:
                    return exit_status(child.wait())
                except KeyboardInterrupt:  # not ours to end the child: it was passed a SIGTERM
                    continue
        finally:
            with self._lock:
                self._children.pop(child, None)
