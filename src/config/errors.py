"""The one exception a user's config mistake becomes; importable without torch (families raise it too)."""


class ConfigError(ValueError):
    """A mistake in the config (or in the data it points at) that the user can fix; the message names the key and
    the fix. train.py prints it alone, without a traceback."""
