"""The exceptions liftedge raises for problems a user can fix.

Every error a user can cause (a bad path, an unknown option, a budget that cannot be met)
is a `LiftedgeError`: the CLI prints its message as one sentence and exits non-zero, with
a traceback only under `--debug`. Programming errors stay ordinary exceptions.
"""


class LiftedgeError(ValueError):
    """A problem with the user's input or environment, explained in the message."""


class ModelLoadError(LiftedgeError):
    """A checkpoint is missing, corrupt, unsafe (pickle, remote code) or unsupported."""


class CalibrationError(LiftedgeError):
    """Calibration text is missing or too short for the requested samples."""


class BudgetError(LiftedgeError):
    """A memory budget that no plan can meet; the message states the minimum needed
    (`min_ram_nbytes`, when the budget came from a device's RAM)."""

    def __init__(self, message: str, min_ram_nbytes: int | None = None):
        super().__init__(message)
        self.min_ram_nbytes = min_ram_nbytes


class ArtifactError(LiftedgeError):
    """An output that cannot be written, or a packed model / artifact that cannot be read."""
