"""Typed errors that cross the boundary to the user: the CLI turns them into one line and an exit code.
Core code raises these instead of printing; adapters translate outside failures into them."""


class AgentDpoError(Exception):
    """A failure the user can act on; its message is shown as one line (exit 1)."""

    exit_code = 1


class UsageError(AgentDpoError):
    """Bad command-line input (exit 2)."""

    exit_code = 2
