"""The one exception type whose message a user sees."""


class DscovidError(Exception):
    """A user-facing error.

    The message is the single line printed by every command-line tool (without a traceback unless
    ``--debug`` is given). It must say what is wrong and where (file, case, key).
    """
