"""The browser client (static files served at /app/; see docs/web-client.md)."""
