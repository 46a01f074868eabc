"""The pure wire-format layer of PROTOCOL.md: no I/O, shared by server and client."""
