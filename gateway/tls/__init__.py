"""TLS runtime: SSL contexts built from the config's TLS settings, and the listener certificate that reloads live."""
