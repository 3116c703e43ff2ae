"""The messages of the private-registration protocols and the statement of what each party learns,
generated from the plan's budget (one declaration: :data:`MESSAGES` and :func:`leakage`)."""

from __future__ import annotations

from enum import StrEnum

from .plan import LevelBudget


class Tag(StrEnum):
    """Message kinds on the wire (the channel sends the value)."""

    HELLO = "hello"  # P2 -> P1: fixed grid, P2's plan (and CKKS parameters)
    SETUP = "setup"  # P1 -> P2, P1 -> dealer: P1's plan, session id, fixed grid
    KEY = "key"  # P1 -> dealer, P2 -> dealer: PRG key and session id (P2: its plan)
    LEVEL = "level"  # P1 -> all: start pyramid level
    FEATURES = "features"  # P2 -> P1: masked (MPC) or encrypted (CKKS) features of the level / sample
    LEVEL_READY = "level-ready"  # P2 -> P1 (CKKS): the level's point count
    ENCRYPT = "encrypt"  # P1 -> P2 (CKKS): encrypt the features of a URS sample
    CONTEXT = "context"  # CKKS public context (P2 -> P1; FHE-v2 also P1 -> P2)
    CROSS = "cross"  # P1 -> P2 (and dealer): one seam call
    T2 = "t2"  # dealer -> P2: the call's triple share, opened entries only
    REPLY = "reply"  # P2 -> P1: the call's opened values (masked share / decrypted slots)
    CLOSE = "close"
    STATS = "stats"
    ERROR = "error"


#: per protocol: who sends which message to whom
MESSAGES = {
    "mpc": [(Tag.HELLO, "fixed", "moving"), (Tag.KEY, "moving", "dealer"), (Tag.SETUP, "moving", "fixed"),
            (Tag.SETUP, "moving", "dealer"), (Tag.KEY, "fixed", "dealer"), (Tag.LEVEL, "moving", "fixed"),
            (Tag.LEVEL, "moving", "dealer"), (Tag.FEATURES, "fixed", "moving"), (Tag.CROSS, "moving", "fixed"),
            (Tag.CROSS, "moving", "dealer"), (Tag.T2, "dealer", "fixed"), (Tag.REPLY, "fixed", "moving")],
    "fhe-v1": [(Tag.HELLO, "fixed", "moving"), (Tag.SETUP, "moving", "fixed"), (Tag.CONTEXT, "fixed", "moving"),
               (Tag.LEVEL, "moving", "fixed"), (Tag.LEVEL_READY, "fixed", "moving"), (Tag.ENCRYPT, "moving", "fixed"),
               (Tag.FEATURES, "fixed", "moving"), (Tag.CROSS, "moving", "fixed"), (Tag.REPLY, "fixed", "moving")],
}
MESSAGES["fhe-v2"] = MESSAGES["fhe-v1"] + [(Tag.CONTEXT, "moving", "fixed")]

MPC_LIMB_PARTIALS = 2 * 3  # basis limbs x feature limbs (SSD); MI's one-hot features have one limb


def leakage(protocol: str, metric: str, levels: list[LevelBudget]) -> dict:
    """What each party learns in a session of this plan, per call and in total (the report's
    ``secure.leakage``; docs/SECURITY.md explains each line)."""
    per_call = [lev.values_per_call for lev in levels]
    total = sum(lev.values for lev in levels)
    partials = (MPC_LIMB_PARTIALS if metric == "ssd" else 2) if protocol == "mpc" else 1
    out = {
        "values_per_call": per_call,
        "values_bound": total,
        "moving_learns": (
            f"per call the {per_call} values the update reads (SSD: S^T J and two cost sums; MI: the joint "
            f"histogram and its derivative), at most {total} in the session; a malicious party 1 chooses U, "
            f"so these are at most {total} linear functionals of party 2's features of its choice"
            + (f"; MPC opens each value as {partials} limb partials (sums over bit slices of the features)"
               if partials > 1 else "")),
        "fixed_learns": "the plan, the session id, URS sample keys (GMS indices only with --reveal-gms-indices); "
                        + ("every other value is one-time padded in Z_2^64" if protocol == "mpc" else
                           "the decrypted values y + M, M uniform on +-2^mask_bits: statistical hiding of "
                           "mask_bits bits per value"),
    }
    if protocol == "mpc":
        out["dealer_learns"] = ("the plan, the grid and the sample keys; both parties' PRG keys, so the dealer "
                                "colluding with one party learns the other's masked inputs (trusted dealer)")
    return out
