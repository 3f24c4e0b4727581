"""
The one base of errors that carry a machine-readable reason.

Callers count failures by ``reason`` (diagnostics counters, evaluation skip tallies) and show
``message`` to people, so both travel with the exception, and survive pickling across worker
processes.
"""


class ReasonError(ValueError):
    """
    An error with a short machine-readable reason, a human-readable message and a stream key.

    :param reason: short key naming the cause, e.g. 'truncated'; subclasses list theirs
    :param message: human-readable description naming the problem
    :param key: stream (camera namespace) the failed input belongs to, '' when none
    """

    #: Subclasses that set this show 'reason: message' as their text instead of the message.
    reason_in_text = False

    def __init__(self, reason, message, key=''):
        """Store the reason, the message and the key."""
        super().__init__(f'{reason}: {message}' if self.reason_in_text else message)
        self.reason = reason
        self.message = message
        self.key = key

    def __reduce__(self):
        """Keep reason, message and key when pickled (BaseException pickles only ``args``)."""
        return (type(self), (self.reason, self.message, self.key))
