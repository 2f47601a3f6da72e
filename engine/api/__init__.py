"""HTTP: the bare ASGI toolkit, the server's limits, the app, the tenant API."""
