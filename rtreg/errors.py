"""The one exception type for bad input: its message names the problem and the fix."""


class InputError(ValueError):
    """Raised for input that would give a wrong or meaningless result.

    The message always says what is wrong and what the user can do about it.
    """
