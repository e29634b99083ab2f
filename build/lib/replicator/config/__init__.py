"""Configuration: settings from the environment and the command line."""
