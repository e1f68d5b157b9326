"""twistd plugins of twisted-cacheproxy; the options live in the package."""

from twisted.application.service import ServiceMaker

cacheserver = ServiceMaker(
    "cacheserver", "twisted_cacheproxy.tap.server", "A calculator server.", "cacheserver"
)
cacheproxy = ServiceMaker(
    "cacheproxy",
    "twisted_cacheproxy.tap.proxy",
    "A caching proxy for the calculator protocol.",
    "cacheproxy",
)
