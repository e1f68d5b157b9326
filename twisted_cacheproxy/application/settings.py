"""The start-up line: what a service logs, once it listens, about how it
was configured, so an operator sees the effect of every option at once."""

from __future__ import annotations

from ..operations.units import format_size, plural, seconds
from ..transport import wire
from ..transport.addresses import address
from .options import CommonOptions, ProxyOptions, Server, ServerOptions


def _limits(config: CommonOptions) -> str:
    """The connection limits both services share, in words."""
    idle = config["idle-timeout"]
    return (
        f"messages up to {config['max-message-size']} bytes, "
        f"idle timeout {seconds(idle) if idle else 'off'}, "
        f"at most {plural(config['max-connections'], 'connection')}"
    )


def server_settings(config: ServerOptions) -> str:
    """The server's start-up line after its address."""
    age = config["max-age"]
    if config["no-cache"] or not age:
        cache = "answers not cacheable"
    else:
        cache = f"answers cacheable for {'ever' if age == wire.FOREVER else seconds(age)}"
    return f"{cache}; {_limits(config)}"


def proxy_settings(config: ProxyOptions) -> str:
    """The proxy's start-up line after its address."""
    stale = config["stale-if-error"]
    depth = config["upstream-pipeline"]
    servers = config.servers or [Server(config["server-host"], config["server-port"])]
    where = ", ".join(address(s.host, s.port) + (" over TLS" if s.tls else "") for s in servers)
    each = " each" if len(servers) > 1 else ""
    upstream = (
        f"in front of the server{'s' if len(servers) > 1 else ''} at {where} "
        f"({plural(config['upstream-connections'], 'connection')}{each}, "
        f"{'no pipelining' if depth == 1 else f'pipelining {depth} deep'}, "
        f"{plural(config['retries'], 'attempt')}, timeout {seconds(config['timeout'])}"
    )
    if len(servers) > 1:
        interval = config["health-interval"]
        upstream += (
            f", health checks {'every ' + seconds(interval) if interval else 'passive'}, "
            f"{'timeouts retried' if config['retry-timeouts'] else 'timeouts not retried'}"
        )
    upstream += ")"
    cache = (
        f"cache {format_size(config['cache-size'])}, "
        f"stale-if-error {seconds(stale) if stale else 'off'}"
    )
    if config["memcached"]:
        nodes = ", ".join(address(host, port) for host, port in config["memcached"])
        cache += (
            f", shared tier on memcached {nodes} (prefix {config['memcached-prefix']!r}, "
            f"lookup timeout {config['memcached-timeout']} ms, "
            f"{'signed' if config['memcached-secret-file'] else 'unsigned'} entries"
        )
        wait = config["memcached-lock-wait"]
        cache += f", lock wait {wait} ms)" if wait else ")"
    return f"{upstream}; {cache}; {_limits(config)}"
