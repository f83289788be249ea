"""``meshgate demo``: the compose deployment (``compose/``) as local processes, no Docker needed.

``stack.py`` runs it, ``topology.py`` says how the compose files map to local processes, and the demo's own parts
live here too: ``idp.py`` (a token issuer), ``traffic.py`` (a request mix for the dashboards) and ``traces.py`` (a
local stand-in for Jaeger's query API). Each runs as ``python -m gateway.demo.<name>``.
"""
