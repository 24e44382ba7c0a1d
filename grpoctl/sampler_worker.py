"""`loop --async N`: the rollouts sampled in a process of its own, while the trainer updates.

With --async N the rollouts of step t are sampled by the weights after step t - 1 - N
(the initial model, step 0, for the first N + 1 steps), so the sampler can work on
step t + 1 while the trainer updates step t:

    trainer (loop.py, this process)             sampler (python -m grpoctl.sampler_worker)
    rollouts(t)   wait for step t's file  <---  writes step-t/rollouts.jsonl
    score, advantage, update t                  samples step t + 1 .. t + N (queued)
    trained(t)    weights t -> sampler/policy-step-T.safetensors
                  submit step t + 1 + N  --->   queued: loads exactly those weights

What a step samples depends only on (seed, step) and the weights of step t - 1 - N,
never on which side is faster: the same seed gives the same files, and `--resume`
after a kill at any moment gives the files and weights of an uninterrupted run.

The weights of step s stay in RUN/sampler/ until the rollouts they sample (step
s + 1 + N) are written: a resumed run finds every policy its next steps need there
(or rebuilds it while replaying updates: `keep_policy`). A finished run keeps the
last N + 1, which a `--resume --steps` extension samples with.

The sampler process is in a session of its own (a Ctrl-C at the terminal reaches the
trainer only) and is killed with its group on every exit of the loop (`stopped_on_exit`);
if the trainer itself is killed, the kernel kills the sampler (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from grpoctl import process
from grpoctl.errors import GrpoctlError


def policy_of(step: int, async_steps: int) -> int:
    """The step whose weights sample `step`'s rollouts (0 = the initial model)."""
    return max(0, step - 1 - async_steps)


def policy_path(run: Path, step: int) -> Path:
    return run / "sampler" / f"policy-step-{step:06d}.safetensors"


def rollouts_path(run: Path, step: int) -> Path:
    return run / f"step-{step:06d}" / "rollouts.jsonl"


def save_policy(model, path: Path) -> None:
    """The model's weights to `path`, atomically (temporary name, fsync, rename): the
    sampler never reads a partial file, and a kill leaves only a `.*.tmp` that --resume
    removes. safetensors.save_model stores tied weights once."""
    from safetensors.torch import save_model

    path.parent.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_model(model, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        with process.committing(path):
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def keep_policy(loop, step: int) -> None:
    """After the update of `step` (or its replay on --resume): save its weights if the
    step they sample, step + 1 + N, has no rollouts yet and they are not saved already."""
    n, run = loop.cfg.async_steps, loop.run
    if n and step >= 1 and not rollouts_path(run, step + 1 + n).is_file() \
            and not policy_path(run, step).is_file():
        save_policy(loop.model, policy_path(run, step))


class SamplerWorker:
    """The sampler process: submit(...) queues a step, result(step) waits for its file."""

    def __init__(self, cfg, run: Path):
        import dataclasses

        self.run = run
        self.pending: list[int] = []  # submitted steps not yet answered, in order
        self.proc = subprocess.Popen(
            # -c, not -m: the working directory leaves sys.path, as in `python -m grpoctl`
            [sys.executable, "-c", "import sys; del sys.path[0]; "
             "from grpoctl.sampler_worker import main; main()", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parent.parent)]
                + [p for p in [os.environ.get("PYTHONPATH")] if p])})
        self._send({"config": dataclasses.asdict(cfg), "run": str(run)})

    def submit(self, step: int, policy_step: int, prompts: list[dict], seed: int) -> None:
        weights = policy_path(self.run, policy_step) if policy_step else None
        self._send({"step": step, "policy_step": policy_step, "prompts": prompts, "seed": seed,
                    "weights": str(weights) if weights else None})
        self.pending.append(step)

    def result(self, step: int) -> None:
        """Wait until the sampler has written step `step`'s rollouts.jsonl."""
        if step not in self.pending:
            raise GrpoctlError(f"internal: step {step} was not submitted to the sampler")
        while self.pending and self.pending[0] <= step:
            answer = self._answer(self.proc.stdout.readline())
            if answer is None or "error" in answer:
                raise GrpoctlError(self._failure(answer))
            if answer.get("step") == self.pending[0]:
                self.pending.pop(0)

    @staticmethod
    def _answer(line: bytes) -> dict | None:
        """The sampler's answer on one line of its pipe: None at end of file (it died), and
        an {"error": ...} naming the line for one that is not an answer, rather than a
        JSON traceback in the trainer (main() keeps stray output off the pipe; this is
        what is left if anything gets there all the same)."""
        if not line:
            return None
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and ("error" in answer or "step" in answer):
            return answer
        text = line.decode("utf-8", "replace").rstrip("\n")
        if len(text) > 80:
            text = text[:80] + "..."
        return {"error": f"it wrote a line that is not an answer: {text!r}"}

    def _send(self, message: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise GrpoctlError(self._failure(None)) from None

    def _failure(self, answer: dict | None) -> str:
        """One line saying that the sampler stopped, and why."""
        doing = f"while sampling step {self.pending[0]}" if self.pending else "at start"
        if answer is not None:
            return f"the --async sampler process (pid {self.proc.pid}) failed {doing}: " \
                   f"{answer['error']}"
        status = self.proc.wait()
        how = (f"was killed by {signal.Signals(-status).name}" if status < 0
               else f"exited with status {status}")
        return (f"the --async sampler process (pid {self.proc.pid}) {how} {doing}; "
                "--resume continues the run")

    def close(self) -> None:
        """Kill the sampler's process group and remove what a killed write left."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        for step in self.pending:  # a rollouts.jsonl the sampler was writing
            for stale in rollouts_path(self.run, step).parent.glob(".rollouts.jsonl.*.tmp"):
                stale.unlink(missing_ok=True)
        self.pending = []


_running: list[SamplerWorker] = []


@contextlib.contextmanager
def stopped_on_exit():
    """Around run_loop: every sampler started inside is stopped when it ends, however
    (an error, Ctrl-C, SIGTERM as KeyboardInterrupt): no process outlives the loop."""
    started = len(_running)
    try:
        yield
    finally:
        while len(_running) > started:
            _running.pop().close()


class AsyncRollouts:
    """The loop's side of --async: which step to sample with which weights, and when."""

    def __init__(self, loop, prompts_of, last_done: int, steps: int):
        self.loop, self.run, self.n = loop, loop.run, loop.cfg.async_steps
        self.prompts_of, self.steps = prompts_of, steps
        # Weights nobody needs any more (a kill after the rollouts they sampled were written)
        for path in (self.run / "sampler").glob("policy-step-*.safetensors"):
            s = int(path.stem.split("-")[-1])
            if rollouts_path(self.run, s + 1 + self.n).is_file():
                path.unlink()
        self.worker: SamplerWorker | None = None  # started at the first step to sample
        for step in range(last_done + 1, min(last_done + 1 + self.n, steps) + 1):
            self._submit(step)

    def _submit(self, step: int) -> None:
        from grpoctl.loop import step_seed

        if step > self.steps or rollouts_path(self.run, step).is_file():
            return
        p = policy_of(step, self.n)
        if p and not policy_path(self.run, p).is_file():
            raise GrpoctlError(f"{policy_path(self.run, p)}: missing: step {step} is sampled by "
                               f"the weights after step {p} (--async {self.n}), and they were "
                               "deleted; resume from an earlier checkpoint is not possible")
        if self.worker is None:
            self.worker = SamplerWorker(self.loop.cfg, self.run)
            _running.append(self.worker)
        self.worker.submit(step, p, self.prompts_of(step), step_seed(self.loop.cfg.seed, step))

    def rollouts(self, step: int) -> list[dict]:
        """Step `step`'s rollouts, once the sampler has written them."""
        from grpoctl.records import read_records

        path = rollouts_path(self.run, step)
        if not path.is_file():
            self.worker.result(step)
        p = policy_of(step, self.n)
        if p:  # its weights have done their work
            policy_path(self.run, p).unlink(missing_ok=True)
        return read_records(str(path))

    def trained(self, step: int) -> None:
        """After the update of `step`: hand its weights over, queue step + 1 + N."""
        keep_policy(self.loop, step)
        self._submit(step + 1 + self.n)

    def metrics(self, step: int) -> dict:
        p = policy_of(step, self.n)
        return {"policy_step": p, "policy_lag": step - 1 - p}

    def close(self) -> None:
        if self.worker is None:
            return
        if self.worker in _running:
            _running.remove(self.worker)
        self.worker.close()


# --- the sampler process -------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel SIGKILLs this process when the trainer dies (even by SIGKILL),
    so a killed loop leaves no sampler writing into its run directory."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the trainer died before the line above
        os._exit(1)


def answer_pipe():
    """The answers' own copy of fd 1, opened for bytes; fd 1 itself then points at stderr,
    so nothing else written to it (a print, C code, a child process) lands among the
    answers. The copy is not inherited by children (os.dup)."""
    sys.stdout.flush()
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return answer


def main() -> None:
    _die_with_parent(int(sys.argv[1]))
    answer = answer_pipe()
    try:
        _serve(answer)
    except Exception as e:  # one line for the trainer to report
        answer.write((json.dumps({"error": str(e).splitlines()[0] if str(e) else repr(e)})
                      + "\n").encode())
        answer.flush()
        sys.exit(1)


def _serve(answer) -> None:
    import torch

    from grpoctl.config import LoopConfig
    from grpoctl.display import NullDisplay
    from grpoctl.loop import Loop, lora_settings
    from grpoctl.models import load_tokenizer, load_training_policy
    from grpoctl.records import write_records

    first = json.loads(sys.stdin.readline())
    cfg, run = LoopConfig(**first["config"]), Path(first["run"])
    threads = cfg.sampler_threads if cfg.sampler_threads is not None else cfg.threads
    if threads:
        torch.set_num_threads(threads)
    # Built as the trainer builds its policy (LoRA adapter included), so that the weights
    # it saves load here key for key.
    loop = Loop(cfg, run, NullDisplay())
    loop.model = load_training_policy(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code,
                                      cfg.attn_implementation, False, lora_settings(cfg),
                                      seed=cfg.seed)
    loop.tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    loaded = 0  # the step whose weights the model holds
    for line in sys.stdin:  # EOF: the trainer closed the pipe
        request = json.loads(line)
        p = request["policy_step"]
        if p != loaded:
            from safetensors.torch import load_model

            if p == 0:  # never asked after a later policy; rebuilt for completeness
                raise RuntimeError("the initial policy was asked for after a later one")
            load_model(loop.model, request["weights"], strict=True)
            loaded = p
        records = loop.sample_step(request["prompts"], request["seed"], p)
        path = rollouts_path(run, request["step"])
        path.parent.mkdir(exist_ok=True)
        write_records(records, str(path))
        answer.write((json.dumps({"step": request["step"]}) + "\n").encode())
        answer.flush()


