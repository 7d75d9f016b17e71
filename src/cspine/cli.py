"""`python -m cspine <stage>`: one command line over the kit; every stage is a function in the package.

    python -m cspine run                                  # the whole baseline (synthetic data if none found)
    python -m cspine synth --out input/synthetic          # a synthetic competition only
    python -m cspine prepare --config configs/demo.yaml --data DIR --out runs/demo

Options after the stage name; ``key=value`` words override the config (``slice.epochs=3``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cspine.config import ConfigError, load_config

log = logging.getLogger("cspine")

DEFAULT_CONFIG = Path("configs/demo.yaml")


def _setup_logging(log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers, force=True)


def _config(args: argparse.Namespace):
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return load_config(path, args.overrides)


def _add_common(parser: argparse.ArgumentParser, data: bool = True, out: bool = True) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help=f"experiment YAML (default: {DEFAULT_CONFIG} when present, else built-in defaults)")
    if data:
        parser.add_argument("--data", type=Path, default=None,
                            help="competition folder (default: $CSPINE_DATA, ./input/…, /kaggle/input/…)")
    if out:
        parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<config name>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. slice.epochs=3")


def cmd_synth(args: argparse.Namespace) -> int:
    from cspine.synthetic import make_competition

    cfg = _config(args)
    s = cfg.synth
    root = make_competition(args.out, n_train=s.n_train, n_test=s.n_test, seed=s.seed, image_size=s.image_size,
                            difficulty=s.difficulty, box_fraction=s.box_fraction, mask_fraction=s.mask_fraction,
                            n_slices=s.n_slices or None, workers=args.workers)
    print(f"synthetic competition written to {root}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from cspine.competition import find_data_dir
    from cspine.prepare import prepare

    cfg = _config(args)
    out = args.out or Path("runs") / cfg.name
    index = prepare(cfg, find_data_dir(args.data), out / "cache")
    print(f"{len(index)} slices cached in {out / 'cache'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cspine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")

    p = sub.add_parser("synth", help="write a synthetic competition in the real layout")
    _add_common(p, data=False, out=False)
    p.add_argument("--out", type=Path, default=Path("input/synthetic"), help="competition folder to write")
    p.add_argument("--workers", type=int, default=1, help="processes (output is identical for any number)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="preprocess every training study into the slice cache")
    _add_common(p)
    p.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.func(args)
    except ConfigError as exc:
        log.error("config: %s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; finished work is kept and the next run resumes from it")
        return 130
