"""msgrelay-admin: operator commands on a relay state directory."""
