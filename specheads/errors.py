"""The one exception type users see for bad input.

It subclasses ValueError so library callers can catch it the usual way; the CLI prints its
message alone (no traceback), so every message must name the offending value.
"""


class SpecHeadsError(ValueError):
    pass
