"""The operations surface: HTTP servers beside the services (the live dashboard)."""
