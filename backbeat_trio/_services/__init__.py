"""The services: pulse, HA pulse, lease keeper, reverb, history."""
