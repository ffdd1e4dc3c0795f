"""One exception type for every input the project refuses, so callers can catch it."""


class SpearError(ValueError):
    """Bad input to a public entry point; the message names the module, shape or option."""
