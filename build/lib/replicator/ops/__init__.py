"""The commands besides serve: migrate, doctor, verify, token, and the demo data."""
