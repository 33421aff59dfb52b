"""The `spear` command: where components are wired and configuration is read."""
