"""The exception hierarchy. Every message is one line that names the file or
field at fault and says what to do; the CLI prints it without a traceback."""

from __future__ import annotations


class PhonekitError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class UsageError(PhonekitError):
    """A bad argument or option value."""


class ConfigError(PhonekitError):
    """A model config that is missing, malformed or of an unknown model type."""


class CheckpointError(PhonekitError):
    """Weights that are missing, mis-shaped, truncated or unreadable."""


class TokenizerError(PhonekitError):
    """A tokenizer that cannot be found or read."""


class HubError(PhonekitError):
    """A hub id that cannot be fetched (offline, unknown repo, gated)."""


class QuantError(PhonekitError):
    """A quantization scheme that is unknown or does not fit the model or format."""


class PlanOptionError(QuantError):
    """An override of the plan's defaults (the tied head's input passes or equalization,
    down_proj's input passes, the offsets' storage) that the plan cannot take; its message
    names the option, ``option`` is make_plan's argument that asked, and the caller prefixes
    the flag or variant that asked."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class ExportError(PhonekitError):
    """An export step that failed."""


class BundleError(PhonekitError):
    """A bundle that is missing files, malformed or tampered with."""


class ProfileError(PhonekitError):
    """A device profile that is unknown or malformed."""


class OverBudgetError(PhonekitError):
    """A bundle that exceeds the memory budget of a target device."""

    exit_code = 3
