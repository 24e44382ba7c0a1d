"""`loop --async N`: the rollouts sampled in a process of its own, while the trainer updates.

With --async N the rollouts of step t are sampled by the weights after step t - 1 - N
(the initial model, step 0, for the first N + 1 steps), so the sampler can work on
step t + 1 while the trainer updates step t:

    trainer (loop.py, this process)             sampler (python -m grpoctl.sampler_worker)
    rollouts(t)   wait for step t's file  <---  writes step-t/rollouts.jsonl
    score, advantage, update t                  samples step t + 1 .. t + N (queued)
    trained(t)    weights t -> sampler/policy-step-T.safetensors (written by a thread)
                  submit step t + 1 + N  --->   queued: waits for that file, loads it

What a step samples depends only on (seed, step) and the weights of step t - 1 - N,
never on which side is faster: the same seed gives the same files, and `--resume`
after a kill at any moment gives the files and weights of an uninterrupted run.

The sampler process also samples the evaluations (with the weights of their step) and,
with --refill (--async 1 only), a step's refills, with the weights of the step's own
rollouts; the next step is then submitted once this step's refills are drawn, since its
prompts follow them. With --backend vllm the engine lives in the sampler process and
each policy it loads is pushed into it, then checked on the next rollouts (vllm_sync_*).

The weights of step s stay in RUN/sampler/ until the step they sample (s + 1 + N) is
done: a resumed run finds every policy its next steps need there (or rebuilds it while
replaying updates: `keep_policy`). A finished run keeps the last N + 1, which a
`--resume --steps` extension samples with.

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
import threading
import time
from pathlib import Path

from grpoctl.errors import GrpoctlError, first_line


def policy_of(step: int, async_steps: int) -> int:
    """The step whose weights sample `step`'s rollouts (0 = the initial model)."""
    return max(0, step - 1 - async_steps)


def policy_path(run: Path, step: int) -> Path:
    return run / "sampler" / f"policy-step-{step:06d}.safetensors"


def rollouts_path(run: Path, step: int, attempt: int = 0) -> Path:
    """Where a step's rollouts go (attempt k > 0: --refill's k-th draw, loop.attempt_dir)."""
    from grpoctl.loop import attempt_dir

    return attempt_dir(run, step, attempt) / "rollouts.jsonl"


def step_done(run: Path, step: int) -> bool:
    return (run / f"step-{step:06d}" / "done").is_file()


def policy_weights(model) -> dict:
    """A copy of the model's weights (each tied tensor once, as safetensors.save_model
    stores them), which the next update cannot change while a thread writes it."""
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            weights[name] = tensor.detach().to("cpu", copy=True)
    return weights


def save_policy(weights: dict, path: Path) -> None:
    """`weights` to `path`, atomically (temporary name, fsync, rename): the sampler never
    reads a partial file, and a kill leaves only a `.*.tmp` that --resume removes."""
    from safetensors.torch import save_file

    path.parent.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(weights, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class PolicySave:
    """save_policy in a thread of its own, so that the trainer goes on with its next
    step meanwhile (SmolLM2's 540 MB took the trainer ~2 s a step beside the sampler);
    wait() returns once the file is in place, raising what the write raised."""

    def __init__(self, weights: dict, path: Path):
        self.path, self.error = path, None
        self.thread = threading.Thread(target=self._save, args=(weights,), daemon=True)
        self.thread.start()

    def _save(self, weights: dict) -> None:
        # The lowest CPU priority: the write takes a core the trainer and the sampler
        # leave idle (the sampler waits for these weights), never one of theirs.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            save_policy(weights, self.path)
        except Exception as e:  # raised by wait(), in the trainer's thread
            self.error = e

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise GrpoctlError(f"{self.path}: the weights for the --async sampler were not "
                               f"written: {first_line(self.error)}")


def keep_policy(loop, step: int, in_background: bool = False) -> PolicySave | None:
    """After the update of `step` (or its replay on --resume): save its weights if the
    step they sample, step + 1 + N, is not done and they are not saved already; with
    `in_background`, by a PolicySave (returned)."""
    n, run = loop.cfg.async_steps, loop.run
    path = policy_path(run, step)
    if not n or step < 1 or step_done(run, step + 1 + n) or path.is_file():
        return None
    if in_background:
        return PolicySave(policy_weights(loop.model), path)
    save_policy(policy_weights(loop.model), path)
    return None


def wait_for_weights(path: Path) -> None:
    """In the sampler: a request can name weights the trainer is still writing
    (PolicySave); they appear whole, by a rename. If the trainer dies first, so does
    this process (_die_with_parent)."""
    while not path.is_file():
        time.sleep(0.01)


def gpu_env(device: str | None) -> dict:
    """--sampler-device cuda:K: the sampler process sees only that GPU (as cuda:0), as
    vLLM places its engine on the first GPU it sees; {} for any other device."""
    if not (device or "").startswith("cuda:"):
        return {}
    index = int(device.split(":", 1)[1])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(index + 1)]
    if index >= len(ids):
        raise GrpoctlError(f"--sampler-device {device}: CUDA_VISIBLE_DEVICES={visible} shows "
                           f"{len(ids)} GPU(s)")
    return {"CUDA_VISIBLE_DEVICES": ids[index]}


def sampler_device(device: str | None, trainer_device: str) -> str:
    """The device the sampler process names: --device when no --sampler-device is
    given, cuda for cuda:K (the one GPU gpu_env leaves it), else as given."""
    if device is None:
        return trainer_device
    return "cuda" if device.startswith("cuda:") else device


class SamplerWorker:
    """The sampler process: submit(key, ...) queues a request, key (kind, step, attempt),
    and result(key) waits for its answer (rollouts: once their file is written)."""

    def __init__(self, cfg, run: Path, context_length: int | None = None):
        import dataclasses

        self.run = run
        self.pending: list[tuple] = []  # requests not yet answered, in order: (kind, step, attempt)
        self.answered: dict[tuple, dict] = {}  # answers read while waiting for a later one
        self.proc = subprocess.Popen(
            # -c, not -m: the working directory leaves sys.path, as in `python -m grpoctl`
            [sys.executable, "-c", "import sys; del sys.path[0]; "
             "from grpoctl.sampler_worker import main; main()", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
            env={**os.environ, **gpu_env(cfg.sampler_device), "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parent.parent)]
                + [p for p in [os.environ.get("PYTHONPATH")] if p])})
        self._send({"config": dataclasses.asdict(cfg), "run": str(run),
                    "context_length": context_length})

    def submit(self, key: tuple, policy_step: int, prompts: list[dict], seed: int) -> None:
        """Queue a request, key (kind, step, attempt): kind "rollouts" (written to
        rollouts_path(run, step, attempt)) or "evaluation" (the completions come back in
        the answer)."""
        kind, step, attempt = key
        weights = policy_path(self.run, policy_step) if policy_step else None
        self._send({"kind": kind, "step": step, "attempt": attempt, "policy_step": policy_step,
                    "prompts": prompts, "seed": seed,
                    "weights": str(weights) if weights else None})
        self.pending.append(key)

    def asked(self, request: tuple) -> bool:
        """`request` was submitted and its answer not yet taken by result()."""
        return request in self.pending or request in self.answered

    def result(self, request: tuple) -> dict:
        """Wait for the answer to `request` (a key), reading the earlier ones first."""
        if not self.asked(request):
            raise GrpoctlError(f"internal: {request} was not submitted to the sampler")
        while request not in self.answered:
            answer = self._answer(self.proc.stdout.readline())
            if answer is None or "error" in answer:
                raise GrpoctlError(self._failure(answer))
            if (answer.get("kind"), answer.get("step"), answer.get("attempt")) == self.pending[0]:
                self.answered[self.pending.pop(0)] = answer
        return self.answered.pop(request)

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
        doing = "at start"
        if self.pending:
            kind, step, attempt = self.pending[0]
            doing = f"while sampling the {kind} of step {step}" + (
                f" (refill {attempt})" if attempt else "")
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
        for kind, step, attempt in self.pending:  # a rollouts.jsonl the sampler was writing
            folder = rollouts_path(self.run, step, attempt).parent
            for stale in folder.glob(".rollouts.jsonl.*.tmp"):
                stale.unlink(missing_ok=True)
        self.pending = []


_running: list[AsyncRollouts] = []


@contextlib.contextmanager
def stopped_on_exit():
    """Around run_loop: every sampler started inside is stopped when it ends, however
    (an error, Ctrl-C, SIGTERM as KeyboardInterrupt): no process outlives the loop."""
    started = len(_running)
    try:
        yield
    finally:
        while len(_running) > started:
            _running.pop().stop()


class AsyncRollouts:
    """The loop's side of --async: which rollouts to sample with which weights, and when.
    The loop submits each step's prompts as soon as they are known (N steps ahead; with
    --refill, one: a step's prompts follow the refills of the step before it)."""

    def __init__(self, loop, steps: int, context_length: int | None = None):
        self.loop, self.run, self.n, self.steps = loop, loop.run, loop.cfg.async_steps, steps
        self.context_length = context_length  # the vLLM engine's (loop.context_length)
        self.sampler_metrics: dict[int, dict] = {}  # step -> what the sampler measured
        # Weights nobody needs any more (a kill after the step they sampled was done)
        for path in (self.run / "sampler").glob("policy-step-*.safetensors"):
            if step_done(self.run, int(path.stem.split("-")[-1]) + 1 + self.n):
                path.unlink()
        self.worker: SamplerWorker | None = None  # started at the first request
        self.saving: PolicySave | None = None  # the newest weights, being written

    def _worker(self) -> SamplerWorker:
        if self.worker is None:
            self.worker = SamplerWorker(self.loop.cfg, self.run, self.context_length)
            _running.append(self)
        return self.worker

    def submit(self, step: int, prompts: list[dict], attempt: int = 0) -> None:
        """Queue step `step`'s rollouts (attempt k: --refill's k-th draw), sampled by the
        weights after step policy_of(step), unless they are written or queued already."""
        from grpoctl.loop import attempt_seed

        key = ("rollouts", step, attempt)
        if step > self.steps or rollouts_path(self.run, step, attempt).is_file() \
                or (self.worker and self.worker.asked(key)):
            return
        p = policy_of(step, self.n)
        being_written = self.saving is not None and self.saving.path == policy_path(self.run, p)
        if p and not policy_path(self.run, p).is_file() and not being_written:
            raise GrpoctlError(f"{policy_path(self.run, p)}: missing: step {step} is sampled by "
                               f"the weights after step {p} (--async {self.n}), and they were "
                               "deleted; resume from an earlier checkpoint is not possible")
        self._worker().submit(key, p, prompts, attempt_seed(self.loop.cfg.seed, step, attempt))

    def wait_for_rollouts(self, step: int, prompts: list[dict], attempt: int = 0) -> None:
        """Return once step `step`'s rollouts.jsonl (of `attempt`) is written: asked for
        now if it was not queued before."""
        from grpoctl.checkpoint import is_timing_key

        key = ("rollouts", step, attempt)
        if rollouts_path(self.run, step, attempt).is_file() and not (
                self.worker and self.worker.asked(key)):
            return  # written before this process started (--resume)
        self.submit(step, prompts, attempt)
        answer = self.worker.result(key)
        kept = self.sampler_metrics.setdefault(step, {})
        for name, value in answer.get("metrics", {}).items():  # times: summed over refills
            kept[name] = kept.get(name, 0) + value if is_timing_key(name) else value

    def trained(self, step: int) -> None:
        """After the update of `step`: hand its weights over (for step + 1 + N), written
        while the trainer goes on. The write of the step before is finished first: once
        a step is done, the weights that the steps after it sample with are in place
        (--resume may need them) or rebuilt by its replay."""
        self.wait_for_saving()
        self.saving = keep_policy(self.loop, step, in_background=True)

    def wait_for_saving(self) -> None:
        saving, self.saving = self.saving, None
        if saving is not None:
            saving.wait()

    def done(self, step: int) -> None:
        """After `step` is done: the weights that sampled it have done their work."""
        p = policy_of(step, self.n)
        if p:
            policy_path(self.run, p).unlink(missing_ok=True)

    def evaluation(self, step: int, prompts: list[dict]) -> list[dict]:
        """The evaluation after `step`, sampled by the sampler process with the weights
        after `step` (its backend, as a run without --async evaluates with its own), queued
        behind the rollouts already asked for."""
        self.wait_for_saving()
        path, made = policy_path(self.run, step), False
        if step and not path.is_file():  # not kept for a rollout step (the run's end, a resume)
            save_policy(policy_weights(self.loop.model), path)
            made = True
        worker, key = self._worker(), ("evaluation", step, 0)
        worker.submit(key, step, prompts, None)  # its seed: Loop.sample_evaluation
        try:
            return worker.result(key)["records"]
        finally:
            if made:
                path.unlink(missing_ok=True)

    def metrics(self, step: int) -> dict:
        """The step's lag, and what the sampler measured (vLLM: the weights' sync check)."""
        p = policy_of(step, self.n)
        return {"policy_step": p, "policy_lag": step - 1 - p, **self.sampler_metrics.pop(step, {})}

    def close(self) -> None:
        """At the run's end: the last weights in place (raising what their write raised)
        and the sampler stopped."""
        try:
            self.wait_for_saving()
        finally:
            self.stop()

    def stop(self) -> None:
        """On every exit (stopped_on_exit): a write under way is finished, not left as a
        temporary file; the sampler process is killed."""
        if self.saving is not None:
            self.saving.thread.join()
            self.saving = None
        if self in _running:
            _running.remove(self)
        if self.worker is not None:
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
    from grpoctl.heap import keep_freed_memory

    _die_with_parent(int(sys.argv[1]))
    keep_freed_memory()  # as the trainer (cli.loop): each request reuses the last one's memory
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
    from safetensors.torch import load_model

    from grpoctl.config import LoopConfig
    from grpoctl.display import NullDisplay
    from grpoctl.heap import release_if_grown
    from grpoctl.loop import Loop, lora_settings
    from grpoctl.models import load_tokenizer, load_training_policy
    from grpoctl.records import write_records

    first = json.loads(sys.stdin.readline())
    cfg, run = LoopConfig(**first["config"]), Path(first["run"])
    cfg.device = sampler_device(cfg.sampler_device, cfg.device)
    threads = cfg.sampler_threads if cfg.sampler_threads is not None else cfg.threads
    if threads:
        torch.set_num_threads(threads)
    loop = Loop(cfg, run, NullDisplay())
    loop.tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)

    def initial_policy():
        # Built as the trainer builds its policy (LoRA adapter included), so that the
        # weights it saves load here key for key; --backend vllm samples with an engine
        # fed from it.
        loop.model = load_training_policy(cfg.model, cfg.dtype, cfg.device,
                                          cfg.trust_remote_code, cfg.attn_implementation,
                                          False, lora_settings(cfg), seed=cfg.seed)

    initial_policy()
    if cfg.backend == "vllm":
        loop.start_engine(first["context_length"])
    loaded, check = 0, False  # the step whose weights the model holds; a push to check
    for line in sys.stdin:  # EOF: the trainer closed the pipe
        request = json.loads(line)
        p, step, attempt = request["policy_step"], request["step"], request["attempt"]
        # Where the sampler's time goes (sampler_*_s in the step's metrics): the step is
        # as slow as the slower side, and these say what the sampling side spent.
        times = {}
        if p != loaded:  # (an evaluation can come between a step's refills: back one step)
            start = time.perf_counter()
            if p == 0:
                initial_policy()
            else:
                wait_for_weights(Path(request["weights"]))
                times["sampler_wait_s"] = time.perf_counter() - start
                start = time.perf_counter()
                load_model(loop.model, request["weights"], strict=True)
            if loop.engine is not None:  # pushed into the live engine, checked below
                loop.engine.push_weights(loop.model)
                check = True
            loaded = p
            times["sampler_load_s"] = time.perf_counter() - start
        reply = {"kind": request["kind"], "step": step, "attempt": attempt}
        if request["kind"] == "evaluation":
            reply["records"] = loop.sample_evaluation(step, request["prompts"])
        else:
            start = time.perf_counter()
            records = loop.sample_step(request["prompts"], request["seed"], p)
            times["sampler_sample_s"] = time.perf_counter() - start
            if check:  # the engine's log-probs of these samples against this process's model
                start = time.perf_counter()
                times.update(loop.engine.sync_metrics(loop.model, records, sampled=True),
                             sampler_check_s=time.perf_counter() - start)
                check = False
            reply["metrics"] = times
            path = rollouts_path(run, step, attempt)
            path.parent.mkdir(exist_ok=True)
            write_records(records, str(path))
        answer.write((json.dumps(reply) + "\n").encode())
        answer.flush()
        release_if_grown()  # main() keeps freed memory: bounded here
