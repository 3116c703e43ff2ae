"""CKKS homomorphic encryption for the joint-product seam (TenSEAL / Microsoft SEAL)."""
