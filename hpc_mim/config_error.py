"""The error every config check raises: its own module, so that the sections' modules
(datasets.py, eval_options.py, methods/options.py) can raise it while config.py imports them."""


class ConfigError(ValueError):
    """A bad config key, type or value; the message names the key and where it came from."""
