"""Command-line interface: ``privreg register | apply | evaluate | secure-register | party | dealer | certs | demo``.

Exit codes (README): 0 success; 2 bad input or an output that cannot be written (one line on
stderr, nothing written); 3 the registration ran but its result failed the plausibility checks
(outputs written, ``report.json`` has ``"status": "failed"`` and its ``warnings``; ``--allow-failure``
exits 0 instead); 130 interrupted (SIGINT), 143 terminated (SIGTERM): temporary files removed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .errors import InputError, PrivregError

EXIT_OK, EXIT_INPUT, EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM = 0, 2, 3, 130, 143


class Terminated(BaseException):
    """Raised by the SIGTERM handler so that every ``with`` block cleans up on the way out."""


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
    from .register import INITS, METRICS, OPTIMIZERS, REGULARIZERS, TRANSFORMS
    from .sampling import AUTO_MAX_POINTS, MODES

    p.add_argument("--transform", default="affine", choices=TRANSFORMS)
    p.add_argument("--metric", default="ssd", choices=METRICS)
    p.add_argument("--optimizer", default="auto", choices=OPTIMIZERS,
                   help="auto: Gauss-Newton for SSD/MI, greedy for displacement, else L-BFGS (Adam when sampled)")
    p.add_argument("--levels", type=_numbers(float), default="4,2,1", help="shrink factors, coarse to fine (default 4,2,1)")
    p.add_argument("--sigmas", type=_numbers(float), default=None, help="smoothing sigma per level in mm (default 0.5*factor*spacing)")
    p.add_argument("--iterations", type=_numbers(int), default="100", help="max iterations, one number or one per level")
    p.add_argument("--tol", type=float, default=1e-3, help="stop when a step moves points less than this (mm RMS)")
    p.add_argument("--sampling", default="auto", choices=MODES,
                   help="auto: every point on levels up to --max-points, a fixed random subset of that many on larger "
                        "ones (SSD/MI Gauss-Newton; other metrics use every point); urs: random, redrawn every iteration; "
                        "gms: by gradient magnitude")
    p.add_argument("--sampling-fraction", type=float, default=0.1, help="urs/gms: fraction of the points per draw")
    p.add_argument("--max-points", type=int, default=AUTO_MAX_POINTS, help="auto: points per level at most")
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
    p.add_argument("--reg", default="bending", choices=REGULARIZERS)
    p.add_argument("--init", default="geometry", choices=INITS,
                   help="starting alignment: image centres (geometry), centres of mass (com, moments) or none (identity)")
    p.add_argument("--initial-transform", default=None, help="ITK transform file to start from")
    p.add_argument("--fixed-mask", default=None)
    p.add_argument("--moving-mask", default=None)
    p.add_argument("--no-restart", dest="restart", action="store_false",
                   help="linear, clear: do not restart from a coarse rotation / shift that matches better than the result")
    p.add_argument("--allow-failure", action="store_true",
                   help="exit 0 even when the result fails the plausibility checks (report.json still says so)")
    p.add_argument("--write-inverse", action="store_true",
                   help="also write the inverse transform (inverse.tfm [+ inverse_warp.nii.gz])")
    p.add_argument("--write-jacobian", action="store_true", help="also write jacobian.nii.gz, det(dW/dx) on the fixed grid")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the computation (default: all cores)")
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
    p.add_argument("--reveal-limit", type=float, default=0.1,
                   help="fixed party: refuse plans that would open more values (linear functionals of the fixed "
                        "image) than this fraction of its voxels, counted per peer over all sessions")


def _config_kwargs(a: argparse.Namespace) -> dict:
    from .sampling import Sampling

    levels, iters = a.levels, list(a.iterations)
    return dict(
        optimizer=a.optimizer, levels=levels,
        sigmas=a.sigmas,
        max_iter=iters[0] if len(iters) == 1 else iters, tol_mm=a.tol,
        sampling=Sampling(a.sampling, a.sampling_fraction, a.seed, flat_rate=a.flat_rate, max_points=a.max_points), bins=a.bins, grid_spacing=a.grid_spacing,
        reg_weight=a.reg_weight, reg_kind=a.reg, init=a.init, lncc_radius=a.lncc_radius, step_vox=a.step,
        greedy_sigmas_vox=a.greedy_sigmas, restart=a.restart,
    )


def _read_inputs(a: argparse.Namespace, fixed_needed: bool = True):
    """Read and check everything ``register`` needs before any output exists."""
    from .image import read_image
    from .transforms import load_transform

    fixed = read_image(a.fixed) if fixed_needed else None
    moving = read_image(a.moving)
    fmask = read_image(a.fixed_mask) if getattr(a, "fixed_mask", None) else None
    mmask = read_image(a.moving_mask) if a.moving_mask else None
    init = load_transform(a.initial_transform) if a.initial_transform else None
    for what, obj in (("--fixed-mask", fmask), ("--moving-mask", mmask), ("--initial-transform", init)):
        if obj is not None and obj.ndim != moving.ndim:
            raise InputError(f"{what} is {obj.ndim}D but the images are {moving.ndim}D")
    return fixed, moving, fmask, mmask, init


def _finish(a: argparse.Namespace, report: dict) -> int:
    """Print the verdict's warnings; the exit code of a run that wrote its outputs."""
    for w in report.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    if report.get("status") == "failed":
        print(f"privreg: registration failed its plausibility checks (report: {a.outdir}/report.json)",
              file=sys.stderr)
        return EXIT_OK if a.allow_failure else EXIT_FAILED
    return EXIT_OK


def cmd_register(a: argparse.Namespace) -> int:
    from .outputs import atomic_outdir, check_outdir, write_outputs
    from .register import register

    check_outdir(a.outdir)
    fixed, moving, fmask, mmask, init = _read_inputs(a)
    progress = None if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    with atomic_outdir(a.outdir) as tmp:
        res = register(fixed, moving, a.transform, a.metric, fmask, mmask, init, progress, **_config_kwargs(a))
        write_outputs(tmp, fixed, moving, res, fixed.grid, a.write_inverse, a.write_jacobian)
    r = res.report
    if not a.quiet:
        word = "done" if r["status"] == "ok" else "finished, FAILED"
        print(f"{word}: {r['iterations']} iterations, {r['wall_seconds']:.2f} s, final cost {r['final_value']:.6g} -> {a.outdir}")
    return _finish(a, r)


def cmd_apply(a: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .image import check_image_suffix, read_image, resample, write_image
    from .outputs import atomic_file, check_file_target
    from .transforms.itk_io import load_transforms

    check_file_target(a.output)
    check_image_suffix(a.output)
    ref = read_image(a.reference)
    img = read_image(a.image)
    t = load_transforms(a.transform)
    if t.ndim != ref.ndim or img.ndim != ref.ndim:
        raise InputError("image, reference and transform must have the same dimension")
    out = resample(img, ref.grid, t, mode="nearest" if a.labels else "bilinear", default=a.fill)
    dtype = None
    if a.labels:  # label maps stay integer
        lo, hi = float(out.data.min()), float(out.data.max())
        dtype = np.uint8 if lo >= 0 and hi <= 255 else (np.int16 if -32768 <= lo and hi <= 32767 else np.int32)
        out = out.with_data(torch.round(out.data))
    with atomic_file(a.output) as tmp:
        write_image(out, tmp, dtype=dtype)
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from . import evaluate as ev
    from .image import read_image
    from .outputs import atomic_file

    if not (a.labels or a.images or a.transform):
        raise InputError("evaluate needs --labels, --images or --transform")
    if a.landmarks and not a.transform:
        raise InputError("--landmarks needs --transform (the transform whose target registration error to measure)")
    if a.transform and not a.reference:
        raise InputError("--transform needs --reference IMAGE (the grid on which to evaluate it)")
    if a.transform2 and not a.transform:
        raise InputError("--transform2 needs --transform")
    if a.output:
        from .outputs import check_file_target

        check_file_target(a.output)
    out: dict = {}
    if a.labels:
        f, m = read_image(a.labels[0]), read_image(a.labels[1])
        if not f.grid.same_as(m.grid, tol=1e-3):
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

        ref = read_image(a.reference)
        t = load_transform(a.transform)
        t2 = load_transform(a.transform2) if a.transform2 else None
        if any(x is not None and x.ndim != ref.ndim for x in (t, t2)):
            raise InputError("--transform, --transform2 and --reference must have the same dimension")
        out["jacobian"] = ev.jacobian_stats(t, ref.grid)
        if a.landmarks:
            from .landmarks import read_points

            pf, pm = read_points(a.landmarks[0], ref.grid), read_points(a.landmarks[1], ref.grid)
            if pf.shape != pm.shape:
                raise InputError(f"the landmark files hold {pf.shape[0]} and {pm.shape[0]} points: they must pair up")
            err = ev.tre(t, pf, pm)
            out["tre_mm"] = {"mean": float(err.mean()), "std": float(err.std()) if err.numel() > 1 else 0.0,
                             "max": float(err.max()), "per_point": err.tolist()}
        if t2 is not None:
            out["displacement_rmse_mm"] = ev.displacement_rmse(t, t2, ref.grid)
    text = json.dumps(out, indent=2, default=float)
    if a.output:
        with atomic_file(a.output) as tmp:
            tmp.write_text(text)
    print(text)
    return 0


def _run_moving_party(a: argparse.Namespace, peers):
    """Party 1 of a private run: read MOVING, register through the MPC or CKKS backend, write OUTDIR atomically.

    ``peers`` is a context manager yielding {"fixed", "dealer", "pki"} (addresses and certificates)."""
    from .image import read_image
    from .outputs import atomic_outdir, write_outputs
    from .register import RegistrationConfig
    from .secure.parties import run_moving_party
    from .secure.session import check_secure_config

    if getattr(a, "fixed_mask", None):
        raise InputError("--fixed-mask is not supported in private registration (the mask is party 2's data)")
    from .outputs import check_outdir

    check_outdir(a.outdir)
    _, moving, _, _, _ = _read_inputs(a, fixed_needed=False)
    cfg = _plan_config(a)
    cfg.validate()
    check_secure_config(cfg, a.reveal_gms_indices, a.protocol)
    progress = None if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    with atomic_outdir(a.outdir) as tmp, peers as p:
        res, grid = run_moving_party(moving, p["fixed"], p.get("dealer"), p["pki"], cfg, a.timeout,
                                     a.reveal_gms_indices, progress, protocol=a.protocol)
        write_outputs(tmp, None, moving, res, grid, a.write_inverse, a.write_jacobian)
    return res


def cmd_secure_register(a: argparse.Namespace) -> int:
    from .image import read_image
    from .secure.launch import local_parties

    read_image(a.fixed)  # the spawned party 2 reads it again; a bad file is a clear error here first
    res = _run_moving_party(a, local_parties(a.fixed, a.timeout, dealer=a.protocol == "mpc", cfg=_plan_config(a),
                                             protocol=a.protocol, reveal_limit=a.reveal_limit))
    if not a.quiet:
        s = res.report["secure"]["summary"]
        print(f"done: {res.report['iterations']} iterations, {res.report['wall_seconds']:.2f} s, "
              f"{s['online_MB_per_iteration']:.3f} MB online per iteration -> {a.outdir}")
    return _finish(a, res.report)


def _plan_config(a: argparse.Namespace):
    from .register import RegistrationConfig

    return RegistrationConfig(transform=a.transform, metric=a.metric, **_config_kwargs(a))


def cmd_party(a: argparse.Namespace) -> int:
    from .secure.parties import party_main

    if a.pki is None:
        raise InputError("--pki DIR is required (create it with `privreg certs DIR`)")
    if a.role == "moving":
        if not a.outdir or not a.connect or (a.protocol == "mpc" and not a.dealer):
            raise InputError("party moving needs -o OUTDIR, --connect HOST:PORT and (for mpc) --dealer HOST:PORT")
        from contextlib import nullcontext

        a.moving = a.image
        res = _run_moving_party(a, nullcontext({"fixed": a.connect, "dealer": a.dealer, "pki": a.pki}))
        return _finish(a, res.report)
    return party_main("fixed", a.image, a.listen, a.dealer, a.pki, a.timeout, _fixed_party_config(a), a.protocol,
                      a.once, a.reveal_limit, _ledger_path(a.ledger))


def _fixed_party_config(a: argparse.Namespace):
    """Party 2's own plan: its command line's options (or the launcher's exact configuration)."""
    from .register import RegistrationConfig

    if a.config_json:
        import json

        from .secure.session import config_from_dict

        return config_from_dict(json.loads(a.config_json))
    cfg = RegistrationConfig(transform=a.transform, metric=a.metric, **_config_kwargs(a))
    cfg.validate()
    return cfg


def _ledger_path(text: str | None) -> str | None:
    from .secure.ledger import default_path

    if text is None:
        return str(default_path())
    return None if text == "none" else text


def cmd_dealer(a: argparse.Namespace) -> int:
    from .secure.parties import party_main

    return party_main("dealer", None, a.listen, None, a.pki, a.timeout, once=a.once)


def cmd_certs(a: argparse.Namespace) -> int:
    from .net.pki import make_pki

    make_pki(a.directory, days=a.days)
    print(f"CA and certificates for moving, fixed, dealer in {a.directory} (give each party ca.pem and its own pair)")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(a.outdir)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``privreg: error: ...``, exit 2) and defaults in ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"privreg: error: {self.prog.split()[-1]}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_INPUT)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="privreg", description="Image registration, in the clear or privately.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("register", help="register MOVING to FIXED")
    _add_register_args(r)
    r.set_defaults(func=cmd_register)
    ap = sub.add_parser("apply", help="warp an image or label map with a saved transform")
    ap.add_argument("image")
    ap.add_argument("reference", help="image whose grid the output takes (the fixed image)")
    ap.add_argument("transform", nargs="+",
                    help="ITK transform files (.tfm, .txt, .mat, .h5: linear, B-spline, composite) or displacement-field "
                         "images (ANTs Warp.nii.gz), in ANTs -t order: the last one is applied to points first")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--labels", action="store_true", help="label map: nearest neighbour, written as integers")
    ap.add_argument("--fill", type=float, default=0.0, help="value outside the image")
    ap.set_defaults(func=cmd_apply)
    e = sub.add_parser("evaluate", help="overlap, surface distances, image similarity, Jacobian statistics")
    e.add_argument("--labels", nargs=2, metavar=("FIXED_LABELS", "WARPED_LABELS"))
    e.add_argument("--images", nargs=2, metavar=("FIXED", "WARPED"))
    e.add_argument("--transform", help="transform whose Jacobian to analyse (needs --reference)")
    e.add_argument("--transform2", help="second transform: displacement RMSE against --transform")
    e.add_argument("--landmarks", nargs=2, metavar=("FIXED_POINTS", "MOVING_POINTS"),
                   help="target registration error of --transform: elastix point files or CSV, world mm (LPS)")
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
    pa.add_argument("--once", action="store_true", help="fixed party: serve one session and exit (default: keep serving)")
    pa.add_argument("--ledger", default=None,
                    help="fixed party: file that counts the values opened per image and peer across sessions "
                         "(default ~/.local/state/privreg/ledger.json; 'none': this process only)")
    pa.add_argument("--config-json", default=None, help=argparse.SUPPRESS)  # secure-register's spawned party 2
    _add_register_options(pa)
    _add_secure_args(pa)
    pa.set_defaults(func=cmd_party)
    de = sub.add_parser("dealer", help="run the dealer (correlated randomness; sees no image data)")
    de.add_argument("--listen", required=True, help="HOST:PORT (port 0 = any; printed as LISTENING PORT)")
    de.add_argument("--pki", required=True, help="directory with ca.pem, dealer.pem, dealer.key")
    de.add_argument("--timeout", type=float, default=120.0)
    de.add_argument("--once", action="store_true", help="serve one session and exit (default: keep serving)")
    de.set_defaults(func=cmd_dealer)
    ce = sub.add_parser("certs", help="create a CA and certificates for the three roles")
    ce.add_argument("directory")
    ce.add_argument("--days", type=int, default=30)
    ce.set_defaults(func=cmd_certs)
    d = sub.add_parser("demo", help="run the demo on bundled sample data")
    d.add_argument("-o", "--outdir", default="out/demo")
    d.set_defaults(func=cmd_demo)
    return p


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _set_threads(n: int | None) -> None:
    if n is None:
        return
    if not 1 <= n <= 1024:
        raise InputError(f"--threads must be between 1 and 1024, got {n}")
    import torch

    torch.set_num_threads(n)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        _set_threads(getattr(args, "threads", None))
        return args.func(args)
    except PrivregError as exc:
        print(f"privreg: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:  # an output that cannot be written (disk full, permissions) after the checks
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"privreg: error: cannot write output{where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("privreg: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        print("privreg: terminated", file=sys.stderr)
        return EXIT_SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
