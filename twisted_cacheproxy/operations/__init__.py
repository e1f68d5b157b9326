"""Operating a running service: what it counts and exports (`metrics`),
the access log (`accesslog`), the admin site and the services beside the
listener (`admin`), and figures in words (`units`)."""
