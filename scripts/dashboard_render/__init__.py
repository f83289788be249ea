"""The parts of ``scripts/render_dashboards.py``, one concept each.

``grafana`` reads the dashboards (files, panels, Grafana's variables filled in) and needs nothing but the standard
library: the dashboard tests read the dashboards through it too, so the queries they run are the queries drawn.
``prometheus`` is the HTTP API client, ``query`` runs a panel's targets over a time window, ``theme`` holds Grafana's
look (colours, units, axes, legends) and ``draw`` draws one panel of each type with matplotlib.
"""
