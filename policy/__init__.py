"""meshgate's policy half: JWT authentication and Rego authorization, with no dependency on ``gateway``."""
