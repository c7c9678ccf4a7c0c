"""User-facing errors: the CLI prints these as one line and exits with code 2, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (missing file, bad class id, wrong size, corrupt image...).

    The message names the problem and says what to do; `spheregen` prints it as one line and exits 2.
    """
