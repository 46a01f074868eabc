"""Server-to-server forwarding (docs/protocol.md section 7) and push (section 8)."""
