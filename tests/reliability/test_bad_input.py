"""The bad-input matrix: every stage x every kind of broken input.

Each row of CASES is one `grpoctl` command line on one broken input (a file, stdin,
a model directory or a flag). Every row must end with
  - exit status 2,
  - stderr exactly one line, `error: ...`, holding the row's fragment, which names
    file:line and the field wherever the problem has them,
  - nothing on stdout, no output file and no temporary file left behind (a `loop`
    that had started keeps the stages it finished and writes nothing of the bad one).

test_bad_input runs every row through the CLI's entry point, `grpoctl.cli.main()`,
in the test process: a new interpreter costs 0.4 s per row, 4 s with torch, and the
matrix has over 150 rows. test_bad_input_real_process runs a sample of the rows,
with and without torch, as `python -m grpoctl` subprocesses, as a user runs them.
Rows marked "torch" are the ones that load a model before failing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see test_kill_resume.py


# --- valid inputs; every case breaks one thing -----------------------------------


def rec(prompt_id: str, sample: int, **fields) -> dict:
    return {"prompt_id": prompt_id, "sample": sample, **fields}


def lines(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


# What `score` reads: two groups of two, one right and one wrong answer each.
ROLLOUTS = [rec("p0", 0, completion="so \\boxed{4}", answer="4", note={"kept": True}),
            rec("p0", 1, completion="so \\boxed{5}", answer="4"),
            rec("p1", 0, completion="it is 7", answer="7"),
            rec("p1", 1, completion="no idea", answer="7")]
# What `advantage` and `eval --scored` read.
SCORED = [dict(r, reward=float(i % 2 == 0), rewards={"math": float(i % 2 == 0)})
          for i, r in enumerate(ROLLOUTS)]
# What `update` reads: token ids of the tiny byte-level model (258 tokens, 1 = EOS).
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 4, "seed": 0,
            "backend": "hf"}
ADVANTAGES = [dict(r, prompt_ids=[72, 101, 108], completion_ids=[52 + i, 1],
                   logprobs=[-5.5, -5.6], advantage=1.0 if i % 2 == 0 else -1.0,
                   sampling=SAMPLING) for i, r in enumerate(SCORED)]
PROMPTS = [{"prompt": "What is 2 + 2?", "answer": "4", "level": 1},
           {"prompt": "What is 3 + 4?", "answer": "7", "level": 2}]


def with_line(rows: list[dict], index: int, **changes) -> list[dict]:
    """rows with record `index` changed (a value of ... deletes the field)."""
    out = [dict(r) for r in rows]
    for key, value in changes.items():
        if value is ...:
            out[index].pop(key, None)
        else:
            out[index][key] = value
    return out


def raw_line(rows: list[dict], index: int, text: bytes) -> bytes:
    """The JSONL of rows with line index+1 replaced by raw bytes."""
    parts = lines(rows).split(b"\n")
    parts[index] = text
    return b"\n".join(parts)


DEEP = b"[" * 100_000 + b"]" * 100_000


def generic_cases(stage: str, argv: list[str], rows: list[dict]) -> list:
    """The cases every record-reading stage must refuse the same way."""
    n = len(rows)
    return [
        (f"{stage}-empty-file", argv, b"", "in.jsonl: is empty"),
        (f"{stage}-blank-lines-only", argv, b"\n   \n\n", "in.jsonl: is empty"),
        (f"{stage}-truncated-last-line", argv, lines(rows)[:-20], f"in.jsonl:{n}: invalid JSON"),
        (f"{stage}-invalid-json", argv, raw_line(rows, 1, b'{"prompt_id": "p0", sample: 1}'),
         "in.jsonl:2: invalid JSON"),
        (f"{stage}-non-utf8", argv, raw_line(rows, 2, json.dumps(rows[2]).encode()[:-1]
                                             + b', "x": "\xff\xfe"}'),
         "in.jsonl:3: not valid UTF-8"),
        (f"{stage}-utf8-bom", argv, b"\xef\xbb\xbf" + lines(rows), "in.jsonl:1: invalid JSON"),
        (f"{stage}-json-array", argv, json.dumps(rows).encode(),
         "in.jsonl:1: looks like a JSON array"),
        (f"{stage}-pretty-printed", argv, json.dumps(rows[0], indent=2).encode(),
         "in.jsonl:1: invalid JSON"),
        (f"{stage}-not-an-object", argv, lines(rows) + b"42\n",
         f"in.jsonl:{n + 1}: expected a JSON object"),
        (f"{stage}-deep-nesting", argv, raw_line(rows, 1, b'{"x": ' + DEEP + b"}"),
         "in.jsonl:2: JSON nested too deeply"),
        (f"{stage}-nan-in-unknown-field", argv,
         raw_line(rows, 1, json.dumps(rows[1]).encode()[:-1] + b', "judge": NaN}'),
         "in.jsonl:2: field 'judge': NaN or infinity"),
        (f"{stage}-infinity-nested-in-meta", argv,
         raw_line(rows, 3, json.dumps(rows[3]).encode()[:-1] + b', "meta": {"t": [1, -Infinity]}}'),
         "in.jsonl:4: field 'meta.t[1]': NaN or infinity"),
        (f"{stage}-overflowing-number", argv,
         raw_line(rows, 0, json.dumps(rows[0]).encode()[:-1] + b', "score_raw": 1e999}'),
         "in.jsonl:1: field 'score_raw': NaN or infinity"),
        (f"{stage}-duplicate-prompt-sample", argv, lines(rows + [rows[2]]),
         f"in.jsonl:{n + 1}: field 'sample': duplicate (prompt_id, sample) = ('p1', 0), "
         "first on line 3"),
        (f"{stage}-logprobs-length", argv,
         lines(with_line(rows, 1, completion_ids=[5, 6, 1], logprobs=[-1.0])),
         "in.jsonl:2: field 'logprobs': has 1 values but completion_ids has 3 tokens"),
        (f"{stage}-prompt-id-not-string", argv, lines(with_line(rows, 2, prompt_id=17)),
         "in.jsonl:3: field 'prompt_id': expected a string"),
        (f"{stage}-sample-not-int", argv, lines(with_line(rows, 1, sample="1")),
         "in.jsonl:2: field 'sample': expected an integer >= 0"),
        (f"{stage}-sample-negative", argv, lines(with_line(rows, 1, sample=-1)),
         "in.jsonl:2: field 'sample': expected an integer >= 0"),
        (f"{stage}-finish-reason-unknown", argv, lines(with_line(rows, 0, finish_reason="eos")),
         "in.jsonl:1: field 'finish_reason': expected 'stop' or 'length'"),
        (f"{stage}-sampling-temperature-text", argv,
         lines(with_line(rows, 3, sampling={"temperature": "hot"})),
         "in.jsonl:4: field 'sampling': temperature is 'hot'"),
        # Values json.loads reads but json.dumps cannot write (or not from deep in a stage)
        (f"{stage}-int-over-4300-digits", argv,
         raw_line(rows, 1, json.dumps(rows[1]).encode()[:-1] + b', "big": ' + b"9" * 4400 + b"}"),
         "in.jsonl:2: a number JSON cannot hold here"),
        (f"{stage}-nesting-500-levels", argv,  # json.loads reads it; json.dumps deep in a stage may not
         raw_line(rows, 2, json.dumps(rows[2]).encode()[:-1] + b', "x": ' + b"[" * 500
                  + b"]" * 500 + b"}"), "in.jsonl:3: field 'x': JSON nested too deeply"),
        (f"{stage}-nesting-101-levels", argv,
         lines(with_line(rows, 0, x=json.loads("[" * 100 + "]" * 100))),
         "in.jsonl:1: field 'x': JSON nested too deeply (more than 100 levels"),
        (f"{stage}-group-disagrees-on-answer", argv, lines(with_line(rows, 3, answer="8")),
         "in.jsonl:4: field 'answer': '8' differs from '7' on line 3, in the same group"),
        (f"{stage}-group-disagrees-on-prompt", argv,
         lines([dict(r, prompt=f"Q{r['prompt_id']}{r['sample']}") for r in rows]),
         "in.jsonl:2: field 'prompt': 'Qp01' differs from 'Qp00' on line 1"),
    ]


SCORE = ["score", "{in}", "-o", "{out}"]
ADVANTAGE = ["advantage", "{in}", "-o", "{out}"]
EVAL = ["eval", "--scored", "{in}", "--save", "{out}"]
ROLLOUT = ["rollout", "--model", "{model:tiny}", "--prompts", "{in}", "-G", "2",
           "--max-new-tokens", "2", "-o", "{out}"]
LOOP = ["loop", "--model", "{model:tiny}", "--prompts", "{in}", "--eval-prompts", "none",
        "--steps", "1", "--prompts-per-step", "2", "--max-new-tokens", "2", "--quiet",
        "--run-dir", "{out}"]
UPDATE = ["update", "{in}", "--policy", "{model:tiny}", "--out", "{out}"]

USER_REWARDS = b'''
import sys

def nan_reward(completion, answer, record):
    return float("nan")

def boom(completion, answer, record):
    raise KeyError("judge")

def exits(completion, **kwargs):
    sys.exit(3)

def interrupts(completion):
    raise KeyboardInterrupt

def huge_int(completion, answer, record):
    return 10 ** 400

def too_large(completion):
    return 1e300

def word(completion):
    return "high"

def at_the_limit(completion):
    return 1e100

def two_names(text, gold):
    return 1.0
'''
R = {"in.jsonl": lines(ROLLOUTS), "r.py": USER_REWARDS}

# A stand-in for --score-cmd / --advantage-cmd that breaks its output in one way (argv[1])
STAGE_SCRIPT = b'''
import json, sys
mode = sys.argv[1]
rows = [json.loads(line) for line in sys.stdin if line.strip()]
for r in rows:
    r["reward"] = r.get("reward", float(r["sample"] == 0))
    r["advantage"] = 1.0 if r["sample"] == 0 else -1.0
if mode == "drop":
    rows = rows[:-1]
elif mode == "add":
    rows.append(dict(rows[0], sample=7))
elif mode == "rename":
    rows[0]["prompt_id"] = "x" + rows[0]["prompt_id"]
elif mode == "change-completion":
    rows[0]["completion"] += " (edited)"
elif mode == "drop-ids":
    for r in rows:
        del r["completion_ids"]
elif mode == "no-reward":
    for r in rows:
        del r["reward"]
elif mode == "shift-samples":
    for r in rows:
        r["sample"] += 2
elif mode == "change-logprobs":
    rows[0]["logprobs"] = [x - 1.0 for x in rows[0]["logprobs"]]
elif mode == "split-group":
    rows[1]["prompt"] += " (another prompt)"
for r in rows:
    print(json.dumps(r))
'''

# (id, argv, content of in.jsonl (or {file name: content}), fragment[, "torch"[, file]])
CASES = [
    *generic_cases("score", SCORE, ROLLOUTS),
    ("score-missing-completion", SCORE, lines(with_line(ROLLOUTS, 2, completion=...)),
     "in.jsonl:3: field 'completion': missing"),
    ("score-completion-not-string", SCORE, lines(with_line(ROLLOUTS, 1, completion=["a"])),
     "in.jsonl:2: field 'completion': expected a string, got a list"),
    ("score-answer-not-string", SCORE, lines(with_line(ROLLOUTS, 0, answer=4)),
     "in.jsonl:1: field 'answer': expected a string or null, got int"),
    ("score-math-without-answer", SCORE,
     lines(with_line(with_line(ROLLOUTS, 3, answer=None), 2, answer=None)),
     "in.jsonl:3: field 'answer': is missing or null"),
    ("score-unknown-reward", [*SCORE, "--reward", "accuracy"], lines(ROLLOUTS),
     "unknown reward 'accuracy'"),
    ("score-bad-regex", [*SCORE, "--reward", "format:(unclosed"], lines(ROLLOUTS),
     "reward 'format:(unclosed': invalid regular expression"),
    ("score-missing-reward-file", [*SCORE, "--reward", "nowhere/r.py:fn"], lines(ROLLOUTS),
     "no such file nowhere/r.py"),
    ("score-user-reward-nan", [*SCORE, "--reward", "{dir}/r.py:nan_reward"],
     {"in.jsonl": lines(ROLLOUTS), "r.py": USER_REWARDS},
     "in.jsonl:1: field 'rewards.nan_reward': reward '{dir}/r.py:nan_reward' returned nan"),
    ("score-user-reward-raises", [*SCORE, "--reward", "{dir}/r.py:boom"],
     {"in.jsonl": lines(ROLLOUTS), "r.py": USER_REWARDS},
     "in.jsonl:1: field 'rewards.boom': reward '{dir}/r.py:boom' raised KeyError"),
    ("score-user-reward-exits", [*SCORE, "--reward", "{dir}/r.py:exits"], R,
     "in.jsonl:1: field 'rewards.exits': reward '{dir}/r.py:exits' called sys.exit(3)"),
    ("score-user-reward-raises-keyboard-interrupt", [*SCORE, "--reward", "{dir}/r.py:interrupts"],
     R, "in.jsonl:1: field 'rewards.interrupts': reward '{dir}/r.py:interrupts' raised "
        "KeyboardInterrupt"),
    ("score-user-reward-returns-10-to-the-400", [*SCORE, "--reward", "{dir}/r.py:huge_int"], R,
     "in.jsonl:1: field 'rewards.huge_int': reward '{dir}/r.py:huge_int' returned an integer "
     "of 401 digits; a reward must be a finite number"),
    ("score-user-reward-too-large", [*SCORE, "--reward", "{dir}/r.py:too_large"], R,
     "reward '{dir}/r.py:too_large' returned 1e+300; a reward must be at most 1e+100"),
    ("score-user-reward-not-a-number", [*SCORE, "--reward", "{dir}/r.py:word"], R,
     "in.jsonl:1: field 'rewards.word': reward '{dir}/r.py:word' returned 'high'"),
    ("score-weighted-sum-too-large", [*SCORE, "--reward", "{dir}/r.py:at_the_limit=3"], R,
     "in.jsonl:1: field 'reward': the weighted sum of the rewards (3 x at_the_limit) is 3e+100"),
    ("score-user-reward-signature", [*SCORE, "--reward", "{dir}/r.py:two_names"], R,
     "two_names must accept (completion, answer, record), or keyword arguments among "
     "completion, answer, record, prompt"),
    ("score-stdin-truncated", ["score", "-", "-o", "{out}"], {"<stdin>": lines(ROLLOUTS)[:-9]},
     "<stdin>:4: invalid JSON"),

    *generic_cases("advantage", ADVANTAGE, SCORED),
    ("advantage-missing-reward", ADVANTAGE, lines(with_line(SCORED, 1, reward=...)),
     "in.jsonl:2: field 'reward': missing"),
    ("advantage-reward-nan", ADVANTAGE, raw_line(SCORED, 2, b'{"prompt_id": "p1", "sample": 0, '
                                                 b'"reward": NaN}'),
     "in.jsonl:3: field 'reward': expected a finite number, got nan"),
    ("advantage-reward-infinity", ADVANTAGE, raw_line(SCORED, 0, b'{"prompt_id": "p0", '
                                                      b'"sample": 0, "reward": Infinity}'),
     "in.jsonl:1: field 'reward': expected a finite number, got inf"),
    ("advantage-reward-text", ADVANTAGE, lines(with_line(SCORED, 3, reward="1.0")),
     "in.jsonl:4: field 'reward': expected a finite number, got '1.0'"),
    ("advantage-reward-boolean", ADVANTAGE, lines(with_line(SCORED, 3, reward=True)),
     "in.jsonl:4: field 'reward': expected a finite number, got True"),
    ("advantage-rewards-component-nan", ADVANTAGE,
     raw_line(SCORED, 1, b'{"prompt_id": "p0", "sample": 1, "reward": 0, '
                         b'"rewards": {"math": NaN}}'),
     "in.jsonl:2: field 'rewards': component 'math' is nan"),
    ("advantage-reward-int-of-401-digits", ADVANTAGE,
     lines(with_line(SCORED, 2, reward=10 ** 400)),
     "in.jsonl:3: field 'reward': expected a finite number, got an integer of 401 digits"),
    ("advantage-rewards-summing-to-infinity", ADVANTAGE,
     lines(with_line(with_line(SCORED, 0, reward=1.5e308), 1, reward=1.5e308)),
     "in.jsonl:1: field 'reward': 1.5e+308 is too large (at most 1e+100 in size)"),
    ("advantage-component-too-large", ADVANTAGE,
     lines(with_line(SCORED, 1, rewards={"math": -1e200})),
     "in.jsonl:2: field 'rewards': component 'math' is -1e+200, too large"),
    ("advantage-unknown-estimator", [*ADVANTAGE, "--estimator", "ppo"], lines(SCORED),
     "Invalid value for '--estimator': 'ppo' is not one of 'group', 'pairwise', 'rloo'"),
    ("advantage-unknown-std", [*ADVANTAGE, "--std", "sample"], lines(SCORED),
     "Invalid value for '--std': 'sample' is not one of 'group', 'batch', 'none'"),
    ("advantage-std-with-pairwise", [*ADVANTAGE, "--estimator", "pairwise", "--std", "none"],
     lines(SCORED), "--std none applies to --estimator group only"),
    ("advantage-eps-nan", [*ADVANTAGE, "--eps", "nan"], lines(SCORED), "Invalid value for '--eps' / '--adv-eps': 'nan' is not a finite number"),
    ("advantage-group-of-one", ADVANTAGE, lines([r for r in SCORED if r["sample"] == 0]),
     "in.jsonl:1: field 'prompt_id': group 'p0' has 1 sample"),
    ("advantage-group-of-3-pairwise", [*ADVANTAGE, "--estimator", "pairwise"],
     lines(SCORED + [rec("p0", 2, reward=1.0)]),
     "in.jsonl:1: field 'prompt_id': group 'p0' has 3 samples; the pairwise estimator"),
    ("advantage-uneven-groups", ADVANTAGE,
     lines(SCORED + [rec("p2", 0, reward=1.0), rec("p2", 1, reward=0.0),
                     rec("p2", 2, reward=1.0)]),
     "in.jsonl:5: field 'prompt_id': group 'p2' has 3 samples, expected 2"),

    *generic_cases("eval", EVAL, SCORED),
    ("eval-missing-reward", EVAL, lines(with_line(SCORED, 2, reward=...)),
     "in.jsonl:3: field 'reward': missing"),
    ("eval-by-meta-not-an-object", [*EVAL, "--by", "subject"],
     lines([dict(r, meta="algebra") for r in SCORED]),
     "in.jsonl:1: field 'meta': expected an object of the prompt's columns (for --by subject), "
     "got a string"),
    ("eval-by-value-a-list", [*EVAL, "--by", "subject"],
     lines([dict(r, meta={"subject": ["a", "b"]} if i == 3 else {"subject": "a"})
            for i, r in enumerate(SCORED)]),
     "in.jsonl:4: field 'meta.subject': expected a string or number to group by (--by subject), "
     "got a list"),
    ("eval-by-value-an-object", [*EVAL, "--by", "level", "--by", "subject"],
     lines([dict(r, meta={"level": 1, "subject": {"name": "a"}}) for r in SCORED]),
     "in.jsonl:1: field 'meta.subject': expected a string or number"),
    ("eval-pass-k-negative", [*EVAL, "--pass-k", "-1"], lines(SCORED),
     "Pass@k needs 1 <= k <= the samples per prompt (2 here), got k=-1"),
    ("eval-pass-k-above-samples", [*EVAL, "--pass-k", "8"], lines(SCORED),
     "Pass@k needs 1 <= k <= the samples per prompt (2 here), got k=8"),
    ("eval-pass-k-zero", [*EVAL, "--pass-k", "0"], lines(SCORED),
     "Pass@k needs 1 <= k <= the samples per prompt (2 here), got k=0"),
    ("eval-save-to-stdout", ["eval", "--scored", "{in}", "--save", "-"], lines(SCORED),
     "--save -: stdout carries the summary; give --save a file"),

    # rollout: the prompt file is read before the model is loaded
    ("rollout-empty-prompts", ROLLOUT, b"", "in.jsonl: no prompts (the file is empty)"),
    ("rollout-truncated-last-line", ROLLOUT, lines(PROMPTS)[:-6], "in.jsonl:2: invalid JSON"),
    ("rollout-invalid-json", ROLLOUT, raw_line(PROMPTS, 0, b"{'prompt': 'single quotes'}"),
     "in.jsonl:1: invalid JSON"),
    ("rollout-non-utf8", ROLLOUT, lines(PROMPTS) + b'{"prompt": "caf\xe9"}\n',
     "in.jsonl:3: not valid UTF-8"),
    ("rollout-json-array-in-jsonl", ROLLOUT, json.dumps(PROMPTS).encode(),
     "in.jsonl:1: looks like a JSON array; expected JSONL"),
    ("rollout-deep-nesting", ROLLOUT, raw_line(PROMPTS, 1, b'{"prompt": "a", "x": ' + DEEP + b"}"),
     "in.jsonl:2: JSON nested too deeply"),
    ("rollout-nan-column", ROLLOUT, raw_line(PROMPTS, 1, b'{"prompt": "a", "difficulty": NaN}'),
     "in.jsonl:2: field 'difficulty': NaN or infinity"),
    ("rollout-prompt-not-string", ROLLOUT, lines(PROMPTS + [{"prompt": 5}]),
     "in.jsonl:3: field 'prompt': expected a string prompt, got int"),
    ("rollout-prompt-missing", ROLLOUT, lines(PROMPTS + [{"question": "x"}]),
     "in.jsonl:3: field 'prompt': missing"),
    ("rollout-prompt-empty", ROLLOUT, lines([{"prompt": "  "}] + PROMPTS),
     "in.jsonl:1: field 'prompt': empty prompt"),
    ("rollout-prompt-lone-surrogate", ROLLOUT, lines(PROMPTS) + b'{"prompt": "x\\ud800"}\n',
     "in.jsonl:3: field 'prompt': lone surrogate"),
    ("rollout-answer-not-string", ROLLOUT, lines([{"prompt": "a", "answer": [4]}]),
     "in.jsonl:1: field 'answer': expected a string answer, got list"),
    ("rollout-no-prompt-column", ROLLOUT, lines([{"text": "a"}]),
     "in.jsonl:1: no prompt field: none of prompt, problem, question"),
    ("rollout-duplicate-id", [*ROLLOUT, "--id-field", "id"],
     lines([{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}]),
     "in.jsonl:2: field 'id': duplicate id '1'"),
    ("rollout-answer-marker-missing", [*ROLLOUT, "--answer-after", "#### "],
     lines([{"prompt": "a", "answer": "#### 4"}, {"prompt": "b", "answer": "4"}]),
     "in.jsonl:2: field 'answer': no '#### ' in the answer"),
    ("rollout-json-not-a-list", [*ROLLOUT[:4], "{dir}/p.json", *ROLLOUT[5:]],
     {"p.json": b'{"prompt": "a", "answer": 1} trailing'}, "p.json:1: invalid JSON"),
    ("rollout-stdin-bad-row", [*ROLLOUT[:4], "-", *ROLLOUT[5:]],
     {"<stdin>": lines(PROMPTS) + b'{"prompt": null}\n'},
     "<stdin>:3: field 'prompt': expected a string prompt, got NoneType"),
    ("rollout-no-model-dir", [*ROLLOUT[:2], "{dir}/nowhere", *ROLLOUT[3:]], lines(PROMPTS),
     "nowhere: not a model directory (no such directory)"),
    ("rollout-dir-without-model", [*ROLLOUT[:2], "{model:empty}", *ROLLOUT[3:]], lines(PROMPTS),
     "empty: not a model directory (no config.json)"),
    ("rollout-model-without-weights", [*ROLLOUT[:2], "{model:no-weights}", *ROLLOUT[3:]],
     lines(PROMPTS), "no-weights: no *.safetensors weights"),
    ("rollout-corrupt-weights", [*ROLLOUT[:2], "{model:corrupt-weights}", *ROLLOUT[3:]],
     lines(PROMPTS), "corrupt-weights: cannot load model: Error while deserializing header",
     "torch"),
    ("rollout-tokenizer-does-not-match", [*ROLLOUT[:2], "{model:small-vocab}", *ROLLOUT[3:]],
     lines(PROMPTS), "small-vocab: tokenizer has 258 tokens but the model embeds only 100",
     "torch"),

    *generic_cases("update", UPDATE, ADVANTAGES),
    ("update-missing-advantage", UPDATE, lines(with_line(ADVANTAGES, 3, advantage=...)),
     "in.jsonl:4: field 'advantage': missing"),
    ("update-advantage-infinity", UPDATE,
     raw_line(ADVANTAGES, 0, json.dumps(ADVANTAGES[0]).encode().replace(
         b'"advantage": 1.0', b'"advantage": Infinity')),
     "in.jsonl:1: field 'advantage': expected a finite number, got inf"),
    ("update-logprob-positive", UPDATE, lines(with_line(ADVANTAGES, 2, logprobs=[-1.0, 0.5])),
     "in.jsonl:3: field 'logprobs': item 1 is 0.5, a log-probability must be <= 0"),
    ("update-missing-completion-ids", UPDATE,
     lines(with_line(ADVANTAGES, 1, completion_ids=..., logprobs=...)),
     "in.jsonl:2: field 'completion_ids': missing"),
    ("update-empty-prompt-ids", UPDATE, lines(with_line(ADVANTAGES, 1, prompt_ids=[])),
     "in.jsonl:2: field 'prompt_ids': is empty"),
    ("update-negative-token-id", UPDATE, lines(with_line(ADVANTAGES, 0, prompt_ids=[5, -1])),
     "in.jsonl:1: field 'prompt_ids': item 1 is -1"),
    ("update-token-id-beyond-int64", UPDATE, lines(with_line(ADVANTAGES, 1, completion_ids=[10 ** 30, 1])),
     "in.jsonl:2: field 'completion_ids': item 0 is 1000000000000000000000000000000, expected an "
     "integer token id >= 0"),
    ("update-advantage-too-large", UPDATE, lines(with_line(ADVANTAGES, 0, advantage=1e300)),
     "in.jsonl:1: field 'advantage': 1e+300 is too large"),
    ("update-mixed-temperatures", UPDATE,
     lines(with_line(ADVANTAGES, 2, sampling=dict(SAMPLING, temperature=0.7))),
     "in.jsonl:3: field 'sampling': temperature is 0.7 but 1.0 on line 1"),
    ("update-logprob-nan", UPDATE,
     raw_line(ADVANTAGES, 1, json.dumps(ADVANTAGES[1]).encode().replace(b"-5.6", b"NaN")),
     "in.jsonl:2: field 'logprobs': item 1 is nan, expected a finite float", "torch"),
    ("update-token-id-out-of-range", UPDATE,
     lines(with_line(ADVANTAGES, 2, completion_ids=[300, 1])),
     "in.jsonl:3: field 'completion_ids': token id 300 is out of range for a model with 258 "
     "tokens", "torch"),
    ("update-tokenizer-does-not-match", [*UPDATE[:3], "{model:small-vocab}", *UPDATE[4:]],
     lines(ADVANTAGES), "small-vocab: tokenizer has 258 tokens but the model embeds only 100",
     "torch"),
    ("update-corrupt-optimizer-state", [*UPDATE[:3], "{model:bad-optimizer}", *UPDATE[4:]],
     lines(ADVANTAGES), "optimizer.safetensors: cannot read optimizer state", "torch"),
    ("update-corrupt-trainer-state", [*UPDATE[:3], "{model:bad-trainer-state}", *UPDATE[4:]],
     lines(ADVANTAGES), "trainer_state.json: cannot read trainer state", "torch"),
    ("update-policy-not-a-model", [*UPDATE[:3], "{model:empty}", *UPDATE[4:]],
     lines(ADVANTAGES), "empty: not a model directory (no config.json)", "torch"),
    ("update-checkpoint-without-weights", [*UPDATE[:3], "{model:no-weights}", *UPDATE[4:]],
     lines(ADVANTAGES), "no-weights: no *.safetensors weights", "torch"),
    ("update-truncated-weights", [*UPDATE[:3], "{model:truncated-weights}", *UPDATE[4:]],
     lines(ADVANTAGES), "truncated-weights: cannot load model: Error while deserializing header",
     "torch"),
    ("update-unknown-loss-agg", [*UPDATE, "--loss-agg", "sum"], lines(ADVANTAGES),
     "Invalid value for '--loss-agg': 'sum' is not one of 'token-mean', 'seq-mean', 'constant'",
     "torch"),
    ("update-max-tokens-zero", [*UPDATE, "--max-tokens", "0", "--loss-agg", "constant"],
     lines(ADVANTAGES), "Invalid value for '--max-tokens': 0 is not in the range x>=1"),
    ("update-lr-nan", [*UPDATE, "--lr", "nan"], lines(ADVANTAGES),
     "Invalid value for '--lr': 'nan' is not a finite number", "torch"),
    ("update-temperature-negative", [*UPDATE, "--temperature", "-1"], lines(ADVANTAGES),
     "Invalid value for '--temperature': -1.0 is not in the range x>=0"),
    ("update-temperature-nan", [*UPDATE, "--temperature", "nan"], lines(ADVANTAGES),
     "Invalid value for '--temperature': 'nan' is not a finite number"),
    ("update-kl-without-reference", [*UPDATE, "--kl-coef", "0.1"], lines(ADVANTAGES),
     "--kl-coef > 0 needs a reference policy (--ref)", "torch"),

    # loop: prompts and settings are checked before a run directory is made
    ("loop-prompt-file-bad-row", LOOP, lines(PROMPTS + [{"prompt": ["a"]}]),
     "in.jsonl:3: field 'prompt': expected a string prompt, got list"),
    ("loop-eval-prompts-bad-row", [*LOOP[:6], "{dir}/eval.jsonl", *LOOP[7:]],
     {"in.jsonl": lines(PROMPTS), "eval.jsonl": lines(PROMPTS)[:-3]},
     "eval.jsonl:2: invalid JSON"),
    ("loop-group-size-1", [*LOOP, "-G", "1"], lines(PROMPTS), "--group-size must be at least 2"),
    ("loop-pairwise-group-of-3", [*LOOP, "-G", "3", "--estimator", "pairwise"], lines(PROMPTS),
     "--estimator pairwise needs --group-size 2"),
    ("loop-dir-without-model", [*LOOP[:2], "{model:empty}", *LOOP[3:]], lines(PROMPTS),
     "empty: not a model directory (no config.json)", "torch"),
    # ... and a run that has started stops at the bad stage, keeping the stages before it
    ("loop-score-cmd-emits-garbage", [*LOOP, "--score-cmd", "printf garbage"], lines(PROMPTS),
     "output of 'printf garbage':1: invalid JSON", "torch", "step-000001/scored.jsonl"),
    ("loop-advantage-cmd-emits-nan",
     [*LOOP, "--advantage-cmd", f"{sys.executable} {{dir}}/nan_advantage.py"],
     {"in.jsonl": lines(PROMPTS),
      "nan_advantage.py": b"import json, sys\n"
                          b"for line in sys.stdin:\n"
                          b"    r = json.loads(line); r['advantage'] = float('nan')\n"
                          b"    print(json.dumps(r))\n"},
     ":1: field 'advantage': expected a finite number, got nan", "torch",
     "step-000001/advantages.jsonl"),
    # A swapped stage's output is checked against its input before anything is written
    *[(f"loop-{kind}-cmd-{mode}", [*LOOP, f"--{kind}-cmd", f"{sys.executable} {{dir}}/stage.py {mode}"],
       {"in.jsonl": lines(PROMPTS), "stage.py": STAGE_SCRIPT}, fragment, "torch",
       f"step-000001/{'scored' if kind == 'score' else 'advantages'}.jsonl")
      for kind, mode, fragment in [
          ("score", "drop", "stage.py drop': 1 of the 4 samples of "),
          ("score", "add", "stage.py add':5: field 'prompt_id': (prompt_id, sample) = ("),
          ("score", "rename", "stage.py rename':1: field 'prompt_id': (prompt_id, sample) = ('x"),
          ("score", "change-completion", "stage.py change-completion':1: field 'completion': "
                                         "changed from "),
          ("score", "drop-ids", "stage.py drop-ids':1: field 'completion_ids': missing; "),
          ("score", "no-reward", "stage.py no-reward':1: field 'reward': missing"),
          ("advantage", "shift-samples", "stage.py shift-samples':1: field 'prompt_id': "
                                         "(prompt_id, sample) = ("),
          ("advantage", "change-logprobs", "stage.py change-logprobs':1: field 'logprobs': "
                                           "changed from "),
          ("advantage", "split-group", "stage.py split-group':2: field 'prompt': "),
      ]],
    # Flags the command line itself rejects: the same one line as every other error.
    ("score-workers-not-a-number", [*SCORE, "--workers", "two"], lines(ROLLOUTS),
     "error: grpoctl score: Invalid value for '--workers'"),
    ("advantage-unknown-option", [*ADVANTAGE, "--estimater", "group"], lines(SCORED),
     "error: grpoctl advantage: No such option: --estimater"),
    ("update-missing-argument", ["update", *UPDATE[2:]], lines(ADVANTAGES),
     "error: grpoctl update: Missing argument 'records'"),
    ("rollout-group-size-zero", [*ROLLOUT[:-2], "-G", "0", "-o", "{out}"], lines(PROMPTS),
     "error: grpoctl rollout: Invalid value for '--group-size' / '-G'"),
    ("loop-steps-not-a-number", [*LOOP, "--steps", "ten"], lines(PROMPTS),
     "error: grpoctl loop: Invalid value for '--steps'"),
]
# Each row: (id, argv, input, fragment, kind, file a started loop run must not have written).
CASES = [(*c, *("", None)[len(c) - 4:]) for c in CASES]


# --- model directories, each broken in one way -----------------------------------------


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    from grpoctl.models import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    dirs = {"tiny": tiny_model, "empty": root / "empty"}
    dirs["empty"].mkdir()

    def copy(name: str) -> Path:
        dirs[name] = root / name
        shutil.copytree(tiny_model, dirs[name])
        return dirs[name]

    (copy("no-weights") / "model.safetensors").unlink()
    (copy("corrupt-weights") / "model.safetensors").write_bytes(b"\x00" * 7 + b"not safetensors")
    weights = (tiny_model / "model.safetensors").read_bytes()
    (copy("truncated-weights") / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (copy("bad-optimizer") / "optimizer.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00"
                                                                  b"\x00{broken}")
    (copy("bad-trainer-state") / "trainer_state.json").write_text('{"step": ')
    dirs["small-vocab"] = make_tiny_model(root / "small-vocab", seed=0, vocab_size=100)
    return dirs


# --- running a row ----------------------------------------------------------------------


def _prepare(case: tuple, workdir: Path, models: dict[str, Path]) -> tuple[list[str], bytes | None]:
    """Write the row's input files into workdir; return its argv and stdin."""
    name, argv, content = case[:3]
    files = dict(content) if isinstance(content, dict) else {"in.jsonl": content}
    stdin = files.pop("<stdin>", None)
    for file_name, data in files.items():
        (workdir / file_name).write_bytes(data)

    def fill(arg: str) -> str:
        if arg.startswith("{model:"):
            return str(models[arg[len("{model:"):-1]])
        return arg.replace("{in}", str(workdir / "in.jsonl")).replace(
            "{out}", str(workdir / "out")).replace("{dir}", str(workdir))

    return [fill(a) for a in argv], stdin


def _check(case: tuple, workdir: Path, before: list[str], code, out: bytes, err: str) -> None:
    """Exit status 2, one `error:` line with the fragment, nothing written."""
    fragment = case[3].replace("{dir}", str(workdir))
    err = err.strip()
    assert code == 2, err[-2000:]
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err[-2000:]
    assert fragment in err
    assert out == b""
    output, unwritten = workdir / "out", case[5]
    if unwritten:  # a loop run that had started: earlier stages kept, the bad one not written
        assert (output / "config.json").is_file() and not (output / unwritten).exists()
        assert not [p for p in output.rglob("*") if p.name.endswith(".tmp") or p.name == "done"]
    else:
        assert not output.exists() or (output.is_dir() and not any(output.iterdir()))
    assert sorted(p for p in os.listdir(workdir) if p != "out") == before  # no temporary file


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, models, tmp_path, monkeypatch, capfd):
    """The row through the CLI's entry point, `grpoctl.cli.main()`, in this process (a
    subprocess would cost 0.4 s, or 4 s with torch, per row; REAL_PROCESS_ROWS below run
    a sample of rows as real subprocesses). capfd captures file descriptors 1 and 2, so a
    library that prints to the terminal behind Python's back is caught too."""
    from grpoctl.cli import main

    argv, stdin = _prepare(case, tmp_path, models)
    before = sorted(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["grpoctl", *argv])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin or b"")))
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capfd.readouterr()
    _check(case, tmp_path, before, exited.value.code, captured.out.encode(), captured.err)


# A sample of the rows, run as what a user runs: `python -m grpoctl ...` in a new process.
REAL_PROCESS_ROWS = ["score-truncated-last-line", "advantage-reward-nan", "advantage-unknown-option",
                     "eval-pass-k-above-samples", "rollout-stdin-bad-row",
                     "loop-prompt-file-bad-row", "rollout-corrupt-weights", "update-logprob-nan"]


@pytest.fixture(scope="module")
def real_processes(request, models, tmp_path_factory) -> dict[str, tuple]:
    """Start the selected rows' subprocesses two at a time (most of their time is imports)."""
    wanted = {item.callspec.params["name"] for item in request.session.items
              if getattr(item, "originalname", "") == "test_bad_input_real_process"}
    root = tmp_path_factory.mktemp("real-process")

    def run(case: tuple) -> tuple:
        workdir = root / case[0]
        workdir.mkdir()
        argv, stdin = _prepare(case, workdir, models)
        before = sorted(os.listdir(workdir))
        proc = subprocess.run([sys.executable, "-m", "grpoctl", *argv], input=stdin,
                              capture_output=True, cwd=workdir, env=ENV, timeout=300)
        return case[0], (workdir, before, proc)

    cases = [c for c in CASES if c[0] in wanted]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, cases))


@pytest.mark.parametrize("name", REAL_PROCESS_ROWS)
def test_bad_input_real_process(name, real_processes):
    case = next(c for c in CASES if c[0] == name)
    workdir, before, proc = real_processes[name]
    _check(case, workdir, before, proc.returncode, proc.stdout,
           proc.stderr.decode(errors="replace"))


def test_matrix_covers_every_stage():
    stages = {c[1][0] for c in CASES}
    assert stages == {"score", "advantage", "eval", "rollout", "update", "loop"}
    assert len({c[0] for c in CASES}) == len(CASES)  # ids are unique
    assert {c[4] for c in CASES if c[0] in REAL_PROCESS_ROWS} == {"", "torch"}


# --- loop --resume of a damaged run ------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(models, tmp_path_factory) -> Path:
    """A 2-step run with a checkpoint after each step, made in-process (torch is loaded)."""
    from grpoctl.loop import LoopConfig, run_loop

    run = tmp_path_factory.mktemp("loop") / "run"
    cfg = LoopConfig(model=str(models["tiny"]), prompts="arith:train", group_size=2,
                     prompts_per_step=2, steps=2, max_new_tokens=4, eval_prompts=None,
                     save_every=1, keep_last=2, run_dir=str(run), score_workers=0)
    run_loop(cfg)
    return run


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


RESUME_CASES = [  # (id, file of the run damaged, its new content or None to delete, fragment)
    ("resume-corrupt-weights", "checkpoints/step-000002/model.safetensors", b"\x00" * 16,
     "step-000002: cannot load model: Error while deserializing header"),
    ("resume-missing-weights", "checkpoints/step-000002/model.safetensors", None,
     "step-000002: no *.safetensors weights"),
    ("resume-corrupt-optimizer", "checkpoints/step-000002/optimizer.safetensors", b"garbage!!",
     "step-000002/optimizer.safetensors: cannot read optimizer state"),
    ("resume-corrupt-config", "config.json", b'{"model": ',
     "config.json: cannot read the run's settings"),
    ("resume-config-from-another-version", "config.json", b'{"model": "x", "warmup": 10}',
     "config.json: cannot read the run's settings"),
]


@pytest.mark.parametrize("name, damaged, data, fragment", RESUME_CASES,
                         ids=[c[0] for c in RESUME_CASES])
def test_resume_of_a_damaged_run(name, damaged, data, fragment, finished_run, tmp_path,
                                 monkeypatch, capfd):
    """`loop --resume` refuses a damaged run with one line, and leaves it exactly as it was."""
    from grpoctl.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    if data is None:
        (run / damaged).unlink()
    else:
        (run / damaged).write_bytes(data)
    before = _snapshot(run)
    monkeypatch.setattr(sys, "argv", ["grpoctl", "loop", "--resume", "--run-dir", str(run)])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    err = capfd.readouterr().err.strip()
    assert exited.value.code == 2, err[-2000:]
    # Progress lines (the run directory) may come first; the error is the one last line.
    *progress, last = err.splitlines()
    assert last.startswith("error: ") and fragment in last, err
    assert not [line for line in progress if "error" in line.lower() or "Traceback" in line]
    assert _snapshot(run) == before
