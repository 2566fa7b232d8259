"""Benchmarks for backbeat_trio: ``python -m benchmarks`` (or ``nox -s bench``).

Everything runs on loopback against an embedded nats-server. The orchestrator
(:mod:`benchmarks._runner`) starts the servers and drives worker processes over stdin/stdout
JSON lines; the workers are :mod:`benchmarks._w_pulse` (the pulse), :mod:`benchmarks._w_client`
(backbeat_trio clients) and :mod:`benchmarks._w_plain` (the plain asyncio nats-py baselines).
Results go to ``benchmarks/RESULTS.md`` and ``benchmarks/latency.png``.

These are benchmarks, not tests: nothing here asserts on timing.
"""
