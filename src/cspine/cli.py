"""`python -m cspine <stage>`: one command line over the kit; every stage is a function in the package.

    python -m cspine run                                  # the whole baseline (synthetic data if none found)
    python -m cspine synth --out input/synthetic          # a synthetic competition only
    python -m cspine prepare --config demo --data DIR --out runs/demo

Options after the stage name; ``key=value`` words override the config (``slice.epochs=3``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cspine.competition import DataError
from cspine.config import Config, ConfigError, load_config, shipped_configs
from cspine.runs import CheckpointError, Run
from cspine.submission import PredictionError

log = logging.getLogger("cspine")

DEFAULT_CONFIG = "demo"  # a shipped config (cspine/configs/demo.yaml), found from any working directory


def _setup_logging(log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )
    logging.getLogger("cspine").setLevel(logging.INFO)  # our progress; codecs' INFO chatter stays quiet


def _config(args: argparse.Namespace):
    return load_config(args.config or DEFAULT_CONFIG, args.overrides)


def _models_and_config(args: argparse.Namespace) -> tuple[Path, Config]:
    """The run folder to read models from (--models, else runs/<name>) and its config: the run's own
    ``config.yaml`` unless --config names another (which `predict` then checks against the checkpoints)."""
    if args.config is None and args.models is not None and Run(args.models).config.is_file():
        return args.models, load_config(Run(args.models).config, args.overrides)
    cfg = _config(args)
    models = args.models or Path("runs") / cfg.name
    if args.config is None and Run(models).config.is_file():
        cfg = load_config(Run(models).config, args.overrides)
    return models, cfg


def _add_common(parser: argparse.ArgumentParser, data: bool = True, out: bool = True) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help=f"a shipped config ({', '.join(shipped_configs())}) or a YAML file (default: {DEFAULT_CONFIG})",
    )
    if data:
        parser.add_argument(
            "--data",
            type=Path,
            default=None,
            help="competition folder (default: $CSPINE_DATA, ./input/…, /kaggle/input/…)",
        )
    if out:
        parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<config name>)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. slice.epochs=3"
    )


def cmd_synth(args: argparse.Namespace) -> int:
    from cspine.synthetic import make_competition

    cfg = _config(args)
    s = cfg.synth
    root = make_competition(args.out, s, workers=args.workers)
    print(f"synthetic competition written to {root}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from cspine.competition import find_data_dir
    from cspine.pipeline import check_meant_for
    from cspine.prepare import prepare
    from cspine.runs import check_writable

    cfg = _config(args)
    # the run folder first, then the data, and only then the config is written
    check_writable(_run_dir(args, cfg))
    data_dir = find_data_dir(args.data)
    check_meant_for(cfg, data_dir)
    cache = Run(_bound(args, cfg)).cache.root
    index = prepare(cfg, data_dir, cache)
    print(f"{len(index)} slices cached in {cache}")
    return 0


def _pop_fold(args: argparse.Namespace) -> int | None:
    """`fold=K` among the overrides selects the fold (it is not a config key)."""
    fold = None
    rest = []
    for item in args.overrides:
        if item.startswith("fold="):
            value = item.split("=", 1)[1]
            if not value.isdigit():
                raise ConfigError(f"fold={value!r}: a fold is a number from 0")
            fold = int(value)
        else:
            rest.append(item)
    args.overrides = rest
    return fold


def _folds_and_config(args: argparse.Namespace) -> tuple[list[int], Config]:
    """The folds a per-fold command runs (`fold=K`, else every fold the config trains) and the config."""
    fold = _pop_fold(args)
    cfg = _config(args)
    return ([fold] if fold is not None else cfg.folds.trained), cfg


def _run_dir(args: argparse.Namespace, cfg) -> Path:
    return args.out or Path("runs") / cfg.name


def _locked(args: argparse.Namespace, run_dir: Path) -> Path:
    """Holds the run folder's lock until the command ends (`cspine.runs.run_lock`): a stage command beside a
    `run` or another stage on the same folder is refused at once, naming the holder."""
    from cspine.runs import check_writable, run_lock

    check_writable(run_dir)
    args.held.enter_context(run_lock(Run(run_dir)))
    return run_dir


def _bound(args: argparse.Namespace, cfg: Config) -> Path:
    """The run folder of a per-stage command, locked, its config checked against the run's artifacts and
    recorded."""
    from cspine.pipeline import bind_config

    run_dir = _locked(args, _run_dir(args, cfg))
    bind_config(cfg, Run(run_dir))
    return run_dir


def _data_for_run(args: argparse.Namespace, run_dir: Path) -> Path:
    """--data, else the folder the run was set up with, else the usual search."""
    from cspine.competition import find_data_dir

    recorded = Run(run_dir).data_dir() if args.data is None else None
    return recorded or find_data_dir(args.data)


def cmd_train_slices(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from cspine.pipeline import setup_run
    from cspine.runtime import init_distributed
    from cspine.train_slices import train_fold

    folds, cfg = _folds_and_config(args)
    run_dir = _run_dir(args, cfg)
    if not Run(run_dir).cache.index.is_file():
        log.error("%s has no slice cache: run `python -m cspine prepare` first", run_dir)
        return 1
    rt = init_distributed(cfg.device)
    if rt.is_main:  # one writer for labels.csv and folds.csv; the other ranks wait for them
        setup_run(cfg, _data_for_run(args, run_dir), _locked(args, run_dir))
    if rt.distributed:
        dist.barrier()
    for k in folds:
        summary = train_fold(cfg, run_dir, k, rt=rt)
        if rt.is_main:
            print(summary)
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from cspine.runtime import init_distributed
    from cspine.segment import segment

    cfg = _config(args)
    rt = init_distributed(cfg.device)
    run_dir = _bound(args, cfg) if rt.is_main else _run_dir(args, cfg)  # one writer of config.yaml
    if rt.distributed:
        dist.barrier()
    table = segment(cfg, run_dir, rt)
    if rt.is_main:
        print(f"{table['StudyInstanceUID'].nunique()} studies segmented, {len(table)} slices")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from cspine.extract import extract_fold

    folds, cfg = _folds_and_config(args)
    run_dir = _bound(args, cfg)
    for k in folds:
        print(extract_fold(cfg, run_dir, k))
    return 0


def cmd_train_seq(args: argparse.Namespace) -> int:
    from cspine.train_seq import train_seq

    folds, cfg = _folds_and_config(args)
    run_dir = _bound(args, cfg)
    for k in folds:
        sizes = train_seq(cfg, run_dir, k)
        print(f"fold {k}: BLSTM sizes trained: {', '.join(map(str, sizes)) or 'none (all up to date)'}")
    return 0


def cmd_train_vertebrae(args: argparse.Namespace) -> int:
    from cspine.train_vertebrae import train_vertebra_fold

    folds, cfg = _folds_and_config(args)
    run_dir = _bound(args, cfg)
    for k in folds:
        train_vertebra_fold(cfg, run_dir, k)
    return 0


def cmd_crop(args: argparse.Namespace) -> int:
    from cspine.crop import crop

    cfg = _config(args)
    run_dir = _bound(args, cfg)
    table = crop(cfg, run_dir, _data_for_run(args, run_dir))
    print(
        f"{table['StudyInstanceUID'].nunique()} studies cut into crops of C1..C7 in {Run(run_dir).crop_dir}"
    )
    return 0


def cmd_train_crops(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from cspine.runtime import init_distributed
    from cspine.train_crops import train_crop_fold

    folds, cfg = _folds_and_config(args)
    rt = init_distributed(cfg.device)
    run_dir = _bound(args, cfg) if rt.is_main else _run_dir(args, cfg)  # one writer of config.yaml
    if rt.distributed:
        dist.barrier()
    for k in folds:
        train_crop_fold(cfg, run_dir, k, rt)
    return 0


def cmd_blend(args: argparse.Namespace) -> int:
    from cspine.blend import blend

    cfg = _config(args)
    run_dir = _bound(args, cfg)
    blend(cfg, run_dir, cfg.folds.trained)
    print(f"blend in {Run(run_dir).blend_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cspine.evaluate import evaluate

    cfg = _config(args)
    report = evaluate(cfg, _bound(args, cfg))
    print((report / "report.md").read_text())
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cspine.competition import find_data_dir
    from cspine.predict import predict
    from cspine.submission import default_submission_path

    models, cfg = _models_and_config(args)
    out = args.out or default_submission_path()
    train = None
    if Run(models).labels.is_file():
        import pandas as pd

        train = pd.read_csv(Run(models).labels)
    predict(cfg, find_data_dir(args.data), models, out, train=train)
    print(f"submission written to {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from cspine.pipeline import run

    cfg = _config(args)
    run_dir = _run_dir(args, cfg)
    _setup_logging(Run(run_dir).log)
    run(cfg, args.data, run_dir, args.submission)
    return 0


def cmd_holdout(args: argparse.Namespace) -> int:
    from cspine.holdout import holdout

    cfg = _config(args)
    run_dir = _bound(args, cfg)
    holdout(cfg, run_dir, studies=args.studies, seed=args.seed)
    print((Run(run_dir).holdout_dir / "holdout.md").read_text())
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from cspine.explain import explain_fold

    fold = _pop_fold(args) or 0
    cfg = _config(args)
    run_dir = _locked(args, _run_dir(args, cfg))
    for path in explain_fold(run_dir, fold, _data_for_run(args, run_dir), n=args.n):
        print(path)
    return 0


def cmd_package_kaggle(args: argparse.Namespace) -> int:
    from cspine.kaggle import package_kaggle

    models, cfg = _models_and_config(args)
    out = package_kaggle(
        cfg, models, args.out, wheels=not args.no_wheels, dataset=args.dataset, python=args.python
    )
    print(
        f"Kaggle dataset folder ready: {out}\nupload it with: kaggle datasets create -p {out} --dir-mode zip"
    )
    return 0


def cmd_rehearse(args: argparse.Namespace) -> int:
    from cspine.rehearse import Shape, rehearse

    try:
        lo, hi = (int(v) for v in args.slices.split(","))
        top, bottom = (float(v) for v in args.head.split(","))
    except ValueError:
        raise ConfigError(
            f"--slices {args.slices!r} --head {args.head!r}: two numbers each, the least first"
        ) from None
    shape = Shape(size=args.size, slices=(lo, hi), head_mm=(top, bottom), train=args.train, test=args.test)
    rehearse(args.config or "rsna", args.overrides, shape, args.out, args.data)
    return 0


@dataclass(frozen=True)
class Command:
    """One command of the CLI: its name, help line, handler, which of the common options it takes, and its own."""

    name: str
    help: str
    func: Callable[[argparse.Namespace], int]
    data: bool = True  # --data
    out: bool = True  # --out as the run folder (a command whose --out is something else declares it below)
    options: tuple[tuple[tuple[str, ...], dict], ...] = ()  # (flags, add_argument keywords)


def _option(*flags: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    return flags, kwargs


MODELS_OPTION = _option(
    "--models", type=Path, default=None, help="run folder with trained models (default: runs/<name>)"
)
# Every command, in the order `--help` lists them: a new command is one entry.
COMMANDS: tuple[Command, ...] = (
    Command(
        "synth",
        "write a synthetic competition in the real layout",
        cmd_synth,
        data=False,
        out=False,
        options=(
            _option("--out", type=Path, default=Path("input/synthetic"), help="competition folder to write"),
            _option("--workers", type=int, default=1, help="processes (output is identical for any number)"),
        ),
    ),
    Command("prepare", "preprocess every training study into the slice cache", cmd_prepare),
    Command(
        "segment",
        "label every cached slice's vertebrae (a U-Net trained on the masks)",
        cmd_segment,
        data=False,
    ),
    Command("train-slices", "stage 1: train the slice CNN (fold=K, or every fold)", cmd_train_slices),
    Command("extract", "out-of-fold slice features from each fold's CNN", cmd_extract, data=False),
    Command(
        "train-seq", "stage 2: train the BLSTM study model (fold=K, or every fold)", cmd_train_seq, data=False
    ),
    Command(
        "train-vertebrae",
        "the vertebra track: each vertebra's probability (fold=K, or every fold)",
        cmd_train_vertebrae,
        data=False,
    ),
    Command("crop", "the crop track: cut each training study's vertebrae from its DICOM", cmd_crop),
    Command(
        "train-crops",
        "the crop track: a CNN + BiGRU on each vertebra's crops (fold=K, or every fold)",
        cmd_train_crops,
        data=False,
    ),
    Command("blend", "level 2: per target, a calibrated blend of every model", cmd_blend, data=False),
    Command(
        "evaluate",
        "cross-validated report: the paper's tables, competition score, figures",
        cmd_evaluate,
        data=False,
    ),
    Command(
        "predict",
        "test studies → submission.csv",
        cmd_predict,
        out=False,
        options=(
            MODELS_OPTION,
            _option(
                "--out",
                type=Path,
                default=None,
                help="submission path (default: submissions/submission.csv; /kaggle/working/ on Kaggle)",
            ),
        ),
    ),
    Command(
        "run",
        "the whole baseline end to end (synthetic data when none is found)",
        cmd_run,
        options=(_option("--submission", type=Path, default=None, help="submission path"),),
    ),
    Command(
        "holdout",
        "score the run's models on held-out synthetic studies no model saw (every track and the submission)",
        cmd_holdout,
        data=False,
        options=(
            _option("--studies", type=int, default=256, help="held-out studies to draw (default 256)"),
            _option(
                "--seed", type=int, default=None, help="their seed (default: the run's competition's + 1)"
            ),
        ),
    ),
    Command(
        "explain",
        "Grad-CAM figures of a fold's held-out slices with their boxes",
        cmd_explain,
        options=(_option("--n", type=int, default=6, help="figures to write"),),
    ),
    Command(
        "rehearse",
        "a config (default rsna) end to end on real-shaped phantoms, its time cut, every cost measured",
        cmd_rehearse,
        options=(
            _option("--size", type=int, default=512, help="the phantoms' side, px (the real scans: 512)"),
            _option(
                "--slices", default="250,450", help="the phantoms' slices from skull base to T1: least,most"
            ),
            _option(
                "--head",
                default="60,140",
                help="mm of head above the skull base the scans cover: least,most (with 250-450 slices, "
                "0.5-1 mm a slice, as the real scans)",
            ),
            _option("--train", type=int, default=6, help="training phantoms (two folds of three)"),
            _option("--test", type=int, default=2, help="test phantoms"),
        ),
    ),
    Command(
        "package-kaggle",
        "bundle code, wheels and weights as a Kaggle dataset folder",
        cmd_package_kaggle,
        data=False,
        out=False,
        options=(
            _option("--models", type=Path, default=None, help="run folder with trained models"),
            _option("--out", type=Path, default=Path("kaggle_package"), help="folder to write"),
            _option("--no-wheels", action="store_true", help="leave out the dependency wheels"),
            _option(
                "--python",
                default=None,
                help="the notebook's Python version, e.g. 3.11 (default: this one's)",
            ),
            _option(
                "--dataset", default="cspine-bundle", help="the Kaggle dataset's name (dataset-metadata.json)"
            ),
        ),
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The command line, built from `COMMANDS`."""
    parser = argparse.ArgumentParser(prog="python -m cspine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        _add_common(p, data=command.data, out=command.out)
        for flags, kwargs in command.options:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(func=command.func)
    return parser


def error_message(exc: BaseException) -> str:
    """What the command line prints for an error: its own message. An error raised in a DataLoader worker
    reaches the main process as the same type with the worker's traceback for a message; of that, the
    original message is kept, and said to come from a worker."""
    text = str(exc)
    if "\nOriginal Traceback" not in text:
        return text
    lines = text.splitlines()
    for i, line in enumerate(lines):
        head, colon, rest = line.partition(": ")
        if colon and not line.startswith(" ") and head.rsplit(".", 1)[-1] == type(exc).__name__:
            return "\n".join([rest, *lines[i + 1 :]]).strip() + " (in a data-loading worker)"
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        with contextlib.ExitStack() as args.held:  # the run folder's lock, where the command takes it
            return args.func(args)
    except ConfigError as exc:
        log.error("config: %s", error_message(exc))
        return 2
    except (
        DataError,
        OSError,
        CheckpointError,
        PredictionError,
    ) as exc:  # each names its cause; no traceback
        log.error("%s", error_message(exc))
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; finished work is kept and the next run resumes from it")
        return 130
