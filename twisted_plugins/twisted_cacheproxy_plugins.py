"""Twisted plugins of twisted-cacheproxy: the twistd services and the
``sendatonce:`` and ``sendatonce6:`` endpoint strings; the code lives in the package."""

from twisted.application.service import ServiceMaker

from twisted_cacheproxy.transport.endpoint import SendAtOnceParser

cacheserver = ServiceMaker(
    "cacheserver",
    "twisted_cacheproxy.application.tap.server",
    "A calculator server for the course protocol (default: 127.0.0.1:9999).",
    "cacheserver",
)
cacheproxy = ServiceMaker(
    "cacheproxy",
    "twisted_cacheproxy.application.tap.proxy",
    "A caching proxy for the calculator protocol "
    "(default: 127.0.0.1:9998, in front of 127.0.0.1:9999).",
    "cacheproxy",
)
sendatonce = SendAtOnceParser()
sendatonce6 = SendAtOnceParser("sendatonce6", "::")
