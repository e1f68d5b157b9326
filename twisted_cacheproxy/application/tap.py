"""The twistd plugins' entry points, ``twistd cacheserver`` and ``twistd
cacheproxy``: each one's options and the service the composition root
(`compose`) builds from them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service

from .compose import Listen, endpoint_listener, makeProxyService, makeServerService
from .options import CommonOptions, ProxyOptions, ServerOptions


@dataclass(frozen=True)
class TapEntry:
    """What a twistd ``ServiceMaker`` looks up by name: options and a maker."""

    Options: type[CommonOptions]
    make: Callable[[Any, Any, Listen], service.IService]

    def makeService(self, config: CommonOptions) -> service.IService:
        # The reactor twistd installed: imported only now, since importing it
        # when the plugin loads would install the default one first.
        from twisted.internet import reactor

        return self.make(config, reactor, endpoint_listener(reactor))


server = TapEntry(ServerOptions, makeServerService)
proxy = TapEntry(ProxyOptions, makeProxyService)

#: The services by twistd subcommand (a worker process looks its own up).
ENTRIES = {"cacheserver": server, "cacheproxy": proxy}
