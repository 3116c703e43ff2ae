"""Authenticated, encrypted, byte-counted channels between the parties (TLS 1.3, mutual certificates)."""
