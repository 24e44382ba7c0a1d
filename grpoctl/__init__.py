"""grpoctl: GRPO post-training as composable command-line stages.

Each stage is an importable module with plain functions; `grpoctl.cli` only
parses flags and calls them, and `grpoctl.loop` calls the same functions in one
process.
"""

__version__ = "0.1.0"
