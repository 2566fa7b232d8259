"""Sans-IO cores: wire messages, beats, HLC, tempo, schedule, aggregation, lease election,
signing. No trio, no I/O.
"""
