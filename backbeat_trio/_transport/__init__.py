"""The transport interface (pure trio)."""
