"""The one place that imports asyncio and nats-py: NATS bridged into trio."""
