"""The one exception type raymix raises for bad input.

Entry points catch it, print its message (which names the file, field or flag
to change) and exit non-zero; tracebacks are reserved for bugs.
"""


class RaymixError(Exception):
    """Bad input or configuration, with a message that says what to change."""
