"""User-facing training errors: one line, naming what is wrong and what to do."""


class TrainingError(Exception):
    """A run cannot start or continue because of the user's model, data or checkpoint."""
