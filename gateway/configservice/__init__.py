"""The central config service: versioned per-service configs, OPA bundles, an instance registry, gateway status."""
