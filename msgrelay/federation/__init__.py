"""Server-to-server forwarding (PROTOCOL.md section 7) and push (section 8)."""
