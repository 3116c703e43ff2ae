"""Privacy-preserving registration: party processes, the dealer and the secure backends of the seam."""
