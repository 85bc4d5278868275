"""The one exception type for mistakes a user can make (bad path, bad ratio, wrong file).

The CLI prints its message as one line and exits non-zero without a traceback. Anything else
that goes wrong is a bug and is allowed to raise loudly.
"""


class WeloreError(Exception):
    """A problem with the user's input, stated as one sentence that names the fix."""
