"""The errors a user can fix: bad config, data, environments, names of things that do not exist.

``posttrain`` prints one of these as one line and exits 2; any other exception is a bug or an
outage and prints its traceback (``posttrain -v`` shows the traceback of a user error too).
Raise them where user input is checked, with a message that names the bad value and the fix.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave is wrong. A ValueError, so code that caught ValueError before this
    family existed (and tests written against it) still does."""


class ConfigError(UserError):
    """A config file, override, setting or command-line argument is invalid."""


class DataError(UserError):
    """A dataset, input file or run folder does not hold what it should."""


class EnvironmentLoadError(UserError, LookupError):
    """An environment could not be found or built from its options."""


class NotFoundError(UserError, FileNotFoundError):
    """A file, folder, model or dataset the user named does not exist."""


class ServiceError(UserError):
    """A service the run depends on (a served judge, an environment's server) does not answer: the
    user starts it or fixes its address, key or model name."""
