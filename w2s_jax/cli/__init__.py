"""The `w2s` command line: argument parsing for each subcommand, nothing else."""

from w2s_jax.cli.app import main

__all__ = ["main"]
