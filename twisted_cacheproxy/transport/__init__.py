"""The transport layer: the calculator protocol's wire format and the
connections that carry it, knowing nothing of what a payload means.

`wire` (the 12-byte header and its vocabulary), `framing` (length framing,
flow control, idle timeout, half-close), `frameclient` (the requesting
side: one Deferred per request), `service` (what the answering services
share), `endpoint` (the TCP endpoint whose connections send at once),
`payload` (the two encodings as far as a service words its own errors),
`answers` (those errors), `addresses` (HOST:PORT), `numerals` (numbers as
users write them: ASCII digits only).
"""
