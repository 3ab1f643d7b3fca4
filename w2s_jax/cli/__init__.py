"""The `w2s` command line: argument parsing for each subcommand, nothing else."""

from w2s_jax.cli.main import main

__all__ = ["main"]
