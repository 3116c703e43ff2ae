"""Command-line interface: ``privreg register | apply | evaluate | demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import PrivregError


def _add_register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("fixed", help="fixed image (NIfTI, MHA, NRRD, PNG, JPEG, DICOM file or series directory)")
    p.add_argument("moving", help="moving image")
    p.add_argument("-o", "--outdir", required=True, help="output directory")
    _add_register_options(p)


def _numbers(kind: type):
    """argparse type: a comma-separated list of numbers (a clear usage error otherwise)."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def _add_register_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transform", default="affine",
                   choices=["translation", "rigid", "similarity", "affine", "bspline", "displacement", "svf"])
    p.add_argument("--metric", default="ssd", choices=["ssd", "ncc", "lncc", "mi", "mind"])
    p.add_argument("--optimizer", default="auto", choices=["auto", "gn", "lbfgs", "adam", "gd", "greedy"],
                   help="auto: Gauss-Newton for SSD/MI, greedy for displacement, else L-BFGS (Adam when sampled)")
    p.add_argument("--levels", type=_numbers(float), default="4,2,1", help="shrink factors, coarse to fine (default 4,2,1)")
    p.add_argument("--sigmas", type=_numbers(float), default=None, help="smoothing sigma per level in mm (default 0.5*factor*spacing)")
    p.add_argument("--iterations", type=_numbers(int), default="100", help="max iterations, one number or one per level")
    p.add_argument("--tol", type=float, default=1e-3, help="stop when a step moves points less than this (mm RMS)")
    p.add_argument("--sampling", default="full", choices=["full", "urs", "gms"])
    p.add_argument("--sampling-fraction", type=float, default=0.1)
    p.add_argument("--flat-rate", type=float, default=1.0,
                   help="URS, finest level: relative rate of points in flat moving background (< 1: stratified, "
                        "weighted back; clear only)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed -> same points)")
    p.add_argument("--bins", type=int, default=32, help="histogram bins for MI")
    p.add_argument("--lncc-radius", type=int, default=4, help="LNCC window radius in voxels")
    p.add_argument("--step", type=float, default=1.0, help="greedy: largest update per iteration in voxels")
    p.add_argument("--greedy-sigmas", type=_numbers(float), default="1.732,0.7071",
                   help="greedy: smoothing of each update and of the field, in voxels (default 1.732,0.7071)")
    p.add_argument("--grid-spacing", type=float, default=10.0, help="control-point / field spacing in mm")
    p.add_argument("--reg-weight", type=float, default=None,
                   help="regularisation weight; Gauss-Newton B-spline: relative to the data term (default 3e-3 for SSD, 3 for MI), else absolute (default 0)")
    p.add_argument("--reg", default="bending", choices=["diffusion", "elastic", "bending", "folding"])
    p.add_argument("--init", default="geometry", choices=["geometry", "moments", "identity"])
    p.add_argument("--initial-transform", default=None, help="ITK transform file to start from")
    p.add_argument("--fixed-mask", default=None)
    p.add_argument("--moving-mask", default=None)
    p.add_argument("--quiet", action="store_true")


def _add_secure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default="mpc", choices=["mpc", "fhe-v1", "fhe-v2"],
                   help="mpc: secret sharing with a dealer; fhe-v1: CKKS, party 2 keeps the key; fhe-v2: CKKS with "
                        "the work split between the parties, one key pair each (party 1 chooses)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a peer before giving up")
    p.add_argument("--reveal-gms-indices", action="store_true",
                   help="allow GMS: its points (from the moving image's gradients) are sent to the fixed party")
    p.add_argument("--pki", default=None, help="certificate directory (ca.pem, ROLE.pem, ROLE.key); "
                   "secure-register makes a fresh one")


def _config_kwargs(a: argparse.Namespace) -> dict:
    from .sampling import Sampling

    levels, iters = a.levels, list(a.iterations)
    return dict(
        optimizer=a.optimizer, levels=levels,
        sigmas=a.sigmas,
        max_iter=iters[0] if len(iters) == 1 else iters, tol_mm=a.tol,
        sampling=Sampling(a.sampling, a.sampling_fraction, a.seed, flat_rate=a.flat_rate), bins=a.bins, grid_spacing=a.grid_spacing,
        reg_weight=a.reg_weight, reg_kind=a.reg, init=a.init, lncc_radius=a.lncc_radius, step_vox=a.step,
        greedy_sigmas_vox=a.greedy_sigmas,
    )


def write_outputs(out: Path, fixed, moving, result, reference_grid) -> None:
    """transform.tfm|h5, warped.nii.gz, report.json, qc.png (shared by register and secure-register)."""
    from .image import resample, write_image
    from .qc import save_qc
    from .transforms import save_transform
    from .transforms.itk_io import _split

    _, rest = _split(result.transform)
    name = "transform.h5" if rest else "transform.tfm"
    save_transform(result.transform, out / name, reference_grid)
    write_image(result.warped, out / "warped.nii.gz")
    before = resample(moving, reference_grid)
    save_qc(fixed, before, result.warped, out / "qc.png")  # fixed is None for party 1 of a private run
    report = dict(result.report)
    report["transform_file"] = name
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))


def cmd_register(a: argparse.Namespace) -> int:
    from .image import read_image
    from .outputs import atomic_outdir
    from .register import register
    from .transforms import load_transform

    fixed, moving = read_image(a.fixed), read_image(a.moving)
    fmask = read_image(a.fixed_mask) if a.fixed_mask else None
    mmask = read_image(a.moving_mask) if a.moving_mask else None
    init = load_transform(a.initial_transform) if a.initial_transform else None
    progress = None if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    with atomic_outdir(a.outdir) as tmp:
        res = register(fixed, moving, a.transform, a.metric, fmask, mmask, init, progress, **_config_kwargs(a))
        write_outputs(tmp, fixed, moving, res, fixed.grid)
    if not a.quiet:
        r = res.report
        print(f"done: {r['iterations']} iterations, {r['wall_seconds']:.2f} s, final cost {r['final_value']:.6g} -> {a.outdir}")
    return 0


def cmd_apply(a: argparse.Namespace) -> int:
    from .image import read_image, resample, write_image
    from .outputs import atomic_outdir
    from .transforms import load_transform

    ref = read_image(a.reference)
    img = read_image(a.image)
    t = load_transform(a.transform)
    if t.ndim != ref.ndim or img.ndim != ref.ndim:
        from .errors import InputError

        raise InputError("image, reference and transform must have the same dimension")
    out = resample(img, ref.grid, t, mode="nearest" if a.labels else "bilinear")
    target = Path(a.output)
    with atomic_outdir(target.parent / f".{target.name}.d") as tmp:
        write_image(out, tmp / target.name, dtype=None)
    (target.parent / f".{target.name}.d" / target.name).replace(target)
    (target.parent / f".{target.name}.d").rmdir()
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from . import evaluate as ev
    from .image import read_image

    out: dict = {}
    if a.labels:
        f, m = read_image(a.labels[0]), read_image(a.labels[1])
        if not f.grid.same_as(m.grid, tol=1e-3):
            from .errors import InputError

            raise InputError("label maps must be on the same grid (warp one with `privreg apply --labels`)")
        d = ev.dice(f.data.round(), m.data.round())
        out["dice_mean"] = sum(d.values()) / max(len(d), 1)
        out["dice"] = d
        out["jaccard"] = ev.jaccard(f.data.round(), m.data.round())
        out["hd95_mm"] = ev.hd95(f.data > 0, m.data > 0, f.grid)
        out["assd_mm"] = ev.assd(f.data > 0, m.data > 0, f.grid)
    if a.images:
        f, m = read_image(a.images[0]), read_image(a.images[1])
        out.update(ev.evaluate_images(f, m))
    if a.transform:
        from .transforms import load_transform

        ref = read_image(a.reference) if a.reference else None
        t = load_transform(a.transform)
        if ref is not None:
            out["jacobian"] = ev.jacobian_stats(t, ref.grid)
            if a.transform2:
                out["displacement_rmse_mm"] = ev.displacement_rmse(t, load_transform(a.transform2), ref.grid)
    text = json.dumps(out, indent=2, default=float)
    if a.output:
        Path(a.output).write_text(text)
    print(text)
    return 0


def _run_moving_party(a: argparse.Namespace, peers):
    """Party 1 of a private run: read MOVING, register through the MPC or CKKS backend, write OUTDIR atomically.

    ``peers`` is a context manager yielding {"fixed", "dealer", "pki"} (addresses and certificates)."""
    from .errors import InputError
    from .image import read_image
    from .outputs import atomic_outdir
    from .register import RegistrationConfig
    from .secure.parties import run_moving_party
    from .secure.session import check_secure_config

    if getattr(a, "fixed_mask", None):
        raise InputError("--fixed-mask is not supported in private registration (the mask is party 2's data)")
    moving = read_image(a.moving)
    moving.check_finite("moving image")
    cfg = RegistrationConfig(transform=a.transform, metric=a.metric, **_config_kwargs(a))
    cfg.validate()
    check_secure_config(cfg, a.reveal_gms_indices, a.protocol)
    progress = None if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    with atomic_outdir(a.outdir) as tmp, peers as p:
        res, grid = run_moving_party(moving, p["fixed"], p.get("dealer"), p["pki"], cfg, a.timeout,
                                     a.reveal_gms_indices, progress, protocol=a.protocol)
        write_outputs(tmp, None, moving, res, grid)
    return res


def cmd_secure_register(a: argparse.Namespace) -> int:
    from .secure.launch import local_parties

    res = _run_moving_party(a, local_parties(a.fixed, a.timeout, dealer=a.protocol == "mpc"))
    if not a.quiet:
        s = res.report["secure"]["summary"]
        print(f"done: {res.report['iterations']} iterations, {res.report['wall_seconds']:.2f} s, "
              f"{s['online_MB_per_iteration']:.3f} MB online per iteration -> {a.outdir}")
    return 0


def cmd_party(a: argparse.Namespace) -> int:
    from .errors import InputError
    from .secure.parties import party_main

    if a.pki is None:
        raise InputError("--pki DIR is required (create it with `privreg certs DIR`)")
    if a.role == "moving":
        if not a.outdir or not a.connect or (a.protocol == "mpc" and not a.dealer):
            raise InputError("party moving needs -o OUTDIR, --connect HOST:PORT and (for mpc) --dealer HOST:PORT")
        from contextlib import nullcontext

        a.moving = a.image
        _run_moving_party(a, nullcontext({"fixed": a.connect, "dealer": a.dealer, "pki": a.pki}))
        return 0
    return party_main("fixed", a.image, a.listen, a.dealer, a.pki, a.timeout)


def cmd_dealer(a: argparse.Namespace) -> int:
    from .secure.parties import party_main

    return party_main("dealer", None, a.listen, None, a.pki, a.timeout)


def cmd_certs(a: argparse.Namespace) -> int:
    from .net.pki import make_pki

    make_pki(a.directory, days=a.days)
    print(f"CA and certificates for moving, fixed, dealer in {a.directory} (give each party ca.pem and its own pair)")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(a.outdir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="privreg", description="Image registration, in the clear or privately.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("register", help="register MOVING to FIXED")
    _add_register_args(r)
    r.set_defaults(func=cmd_register)
    ap = sub.add_parser("apply", help="warp an image or label map with a saved transform")
    ap.add_argument("image")
    ap.add_argument("reference", help="image whose grid the output takes (the fixed image)")
    ap.add_argument("transform")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--labels", action="store_true", help="nearest-neighbour interpolation for label maps")
    ap.set_defaults(func=cmd_apply)
    e = sub.add_parser("evaluate", help="overlap, surface distances, image similarity, Jacobian statistics")
    e.add_argument("--labels", nargs=2, metavar=("FIXED_LABELS", "WARPED_LABELS"))
    e.add_argument("--images", nargs=2, metavar=("FIXED", "WARPED"))
    e.add_argument("--transform", help="transform whose Jacobian to analyse (needs --reference)")
    e.add_argument("--transform2", help="second transform: displacement RMSE against --transform")
    e.add_argument("--reference", help="reference image (grid) for transform statistics")
    e.add_argument("-o", "--output")
    e.set_defaults(func=cmd_evaluate)
    sr = sub.add_parser("secure-register", help="private registration: spawns party 2 and the dealer on localhost")
    _add_register_args(sr)
    _add_secure_args(sr)
    sr.set_defaults(func=cmd_secure_register)
    pa = sub.add_parser("party", help="run one party of a private registration (two machines)")
    pa.add_argument("role", choices=["moving", "fixed"])
    pa.add_argument("image", help="this party's image")
    pa.add_argument("-o", "--outdir", help="output directory (moving party)")
    pa.add_argument("--listen", help="HOST:PORT to listen on (fixed party; port 0 = any)")
    pa.add_argument("--connect", help="HOST:PORT of the fixed party (moving party)")
    pa.add_argument("--dealer", help="HOST:PORT of the dealer")
    _add_register_options(pa)
    _add_secure_args(pa)
    pa.set_defaults(func=cmd_party)
    de = sub.add_parser("dealer", help="run the dealer (correlated randomness; sees no image data)")
    de.add_argument("--listen", required=True, help="HOST:PORT (port 0 = any; printed as LISTENING PORT)")
    de.add_argument("--pki", required=True, help="directory with ca.pem, dealer.pem, dealer.key")
    de.add_argument("--timeout", type=float, default=120.0)
    de.set_defaults(func=cmd_dealer)
    ce = sub.add_parser("certs", help="create a CA and certificates for the three roles")
    ce.add_argument("directory")
    ce.add_argument("--days", type=int, default=30)
    ce.set_defaults(func=cmd_certs)
    d = sub.add_parser("demo", help="run the demo on bundled sample data")
    d.add_argument("-o", "--outdir", default="out/demo")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PrivregError as exc:
        print(f"privreg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("privreg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
