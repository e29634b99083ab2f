"""The HTTP layer: routes, the SSE response, authentication, metrics and the static client."""
