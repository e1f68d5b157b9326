"""twisted-cacheproxy: a calculator server and a caching proxy on Twisted."""

from importlib import metadata

try:
    #: The installed distribution's version; setup.cfg is the one place it is set.
    __version__ = metadata.version("twisted-cacheproxy")
except metadata.PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "0+unknown"
