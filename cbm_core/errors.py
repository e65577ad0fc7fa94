"""Errors that are the user's to fix: the CLI prints them without a traceback."""


class CbmError(Exception):
    """A problem with the user's input, configuration or environment, explained in the message."""


class ConfigError(CbmError):
    """A configuration file or option is wrong; the message names the key at fault."""


class InputError(CbmError):
    """A data file, column, value or parcel is wrong; the message names it."""


class PluginError(CbmError):
    """A plugin is missing, refused or unable to do what the configuration asks."""
