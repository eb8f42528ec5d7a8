"""The one exception the data package raises for bad input: its message is one sentence a user can act on."""


class DataError(ValueError):
    """Bad data input (missing folder, mismatched classes, too many unreadable images, ...)."""
