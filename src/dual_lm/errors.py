"""The one exception type for user mistakes: the CLI prints its message alone, without a traceback."""


class UserError(ValueError):
    """Bad input from the user (a path, a flag, a config key); the message says what to do."""
