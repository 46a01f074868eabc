"""The pure wire-format layer of docs/protocol.md: no I/O, shared by server and client."""
