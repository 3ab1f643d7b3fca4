"""Errors meant for the user: raised with a message that names the file, line, key or tensor."""


class UserError(Exception):
    """Bad input or configuration. The CLI prints the message and exits with status 2."""
