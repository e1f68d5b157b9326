"""``calc-check``: a conformance checker for any server or caching proxy of
the calculator protocol, in the manner of h2spec and the Autobahn test suite:
a catalogue of cases, each with a stable ID, run against a target, and a
report card (terminal, JSON, HTML).

It is a layer of its own: it speaks the wire format (`transport`) and the
payload encodings (`calculator.codec`, `expression`, `parser`) and knows
nothing of how our own server or proxy work inside.
"""
