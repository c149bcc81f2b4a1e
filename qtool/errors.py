"""Errors a user can cause. Each carries one line that says what is wrong.

The CLI turns a :class:`QtoolError` into ``error: <message>`` and exit code 2;
nothing else in the library prints or exits.
"""


class QtoolError(Exception):
    """Base class: bad input or an unsupported model, reported in one line."""

    exit_code = 2


class ModelError(QtoolError):
    """The model file is missing, unreadable, not ONNX or not supported."""


class DataError(QtoolError):
    """Calibration or evaluation data does not fit the model or is not finite."""


class ConfigError(QtoolError):
    """A preset or option is unknown or has the wrong type."""


class OutputError(QtoolError):
    """The output path cannot be written (missing folder, equal to the input)."""


class TableError(QtoolError):
    """A calibration table is malformed or belongs to another model."""


class InternalError(QtoolError):
    """qtool's own bug (e.g. it wrote a model onnx's checker rejects): exit 3, not the user's fault."""

    exit_code = 3


class PlanError(QtoolError):
    """A saved plan is malformed, belongs to another model, or contradicts itself."""
