"""`python -m grpoctl`: the same as the `grpoctl` command."""

import os
import sys

# `python -m` puts the working directory first on sys.path, so a math_verify.py or
# torch.py lying there would be imported in place of the real one. The `grpoctl`
# script does not, and neither does this: user code runs only when named (--reward).
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from grpoctl.cli import main  # noqa: E402

main()
