"""Small trio utilities shared by the client and the services."""
