"""Two-party secret sharing over Z_2^64 for the joint-product seam (PPIR-MPC)."""
