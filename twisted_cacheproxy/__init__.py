"""twisted-cacheproxy: a calculator server and a caching proxy on Twisted."""

__version__ = "0.1.0"
