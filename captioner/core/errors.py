"""The one exception type for faults a user can fix."""


class CaptionerError(Exception):
    """An expected fault with a message that says what failed and what to do.

    `captioner.cli.main` prints these as one paragraph, without a traceback.
    """
