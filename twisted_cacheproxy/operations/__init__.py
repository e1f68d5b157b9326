"""Operating a running service: what it counts and exports (`metrics`),
the access log (`accesslog`), the admin site (`site`, `statuspage`), the
services beside the listener (`services`), and figures in words (`units`)."""
