"""The agent client: configuration and the nursery-scoped client."""
