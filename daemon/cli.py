"""The `tomolive` command: argument parsing and progress display; the work lives in core/ and
the service. Every failure prints one line `tomolive: error: ...` and exits non-zero."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.errors import one_line
from .logs import configure_logging
from .naming import output_stem
from .result_lines import tomogram_done_line

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    configure_logging(logging.INFO)
    try:
        return int(args.handler(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("tomolive: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, OSError) as error:
        print(f"tomolive: error: {one_line(error)}", file=sys.stderr)
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tomolive",
        description="Segment cryo-electron tomograms as the microscope produces them.",
    )
    parser.add_argument("--version", action="version", version=f"tomolive {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in (_add_demo, _add_run, _add_segment, _add_repick, _add_train, _add_distill,
                     _add_synth, _add_evaluate, _add_models, _add_status, _add_retry,
                     _add_batch, _add_star_combine):
        register(sub)
    return parser


# --- segment ----------------------------------------------------------------------------------

def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment tomogram files into DIR/STEM/, or the runs of "
                                       "a copick project back into it (--copick)")
    p.add_argument("tomograms", nargs="*", metavar="TOMO", type=Path)
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="the output folder (required for files; with --copick, also write "
                        "the usual result folders there)")
    p.add_argument("--model", type=Path, metavar="FILE",
                   help="model bundle (.safetensors); default: the shipped default model")
    p.add_argument("--pixel-size", type=float, metavar="A", dest="pixel_size_a",
                   help="voxel size in Å, overriding the file headers")
    p.add_argument("--tilt-series-pattern", metavar="REGEX", type=_name_pattern,
                   default=_default_name_pattern(),
                   help="how the STAR files name each tilt series (rlnTomoName): the group "
                        "(?P<name>...) matched against the file's stem, else the stem; "
                        "default: Warp's TS_01_10.00Apx -> TS_01; '' for the stem as it is")
    _add_device_args(p)
    _add_decision_args(p)
    p.add_argument("--save-probabilities", nargs="?", const="all", metavar="CLASS,...",
                   help="also write STEM_<class>_prob.mrc (bytes, 0-255 for 0-1) for every "
                        "class, or the ones named; `tomolive repick` needs every class's")
    p.add_argument("--specimen-mask", action="store_true",
                   help="drop what the network finds outside the specimen slab (vacuum, "
                        "surface ice, carbon; gold is kept) and write STEM_specimen_mask.mrc; "
                        "for lamellae with a void above and below. Without it the slab is "
                        "still measured and its thickness and tilt recorded")
    p.add_argument("--claim", action="store_true",
                   help="take leases in the output folder (batch jobs beside running daemons)")
    p.add_argument("--lease-seconds", type=float, default=120.0)
    p.add_argument("--relative-to", type=Path, metavar="ROOT",
                   help="with --claim: the daemons' watched root; outputs and leases follow "
                        "the files' folders below it, as the daemons' do")
    c = p.add_argument_group("copick projects (interop/copick.py)")
    c.add_argument("--copick", type=Path, metavar="CONFIG.json",
                   help="segment the runs of this copick project and write the results back "
                        "through copick (user id tomolive)")
    c.add_argument("--run", action="append", default=[], metavar="NAME", dest="runs",
                   help="a run to segment (repeatable; default: every run)")
    c.add_argument("--copick-session", metavar="ID",
                   help="the session id to write under (default: MODEL-vVERSION)")
    c.add_argument("--tomo-type", metavar="T",
                   help="the tomogram type to read (default: the first at the voxel spacing)")
    c.add_argument("--voxel-spacing", type=float, metavar="A", dest="voxel_spacing_a",
                   help="the voxel spacing to read (default: the one nearest the model's)")
    c.add_argument("--watch", type=float, metavar="SECONDS",
                   help="keep watching the project: segment new runs and tomograms as they "
                        "appear, looking every SECONDS")
    p.set_defaults(handler=_cmd_segment)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: bfloat16 where the CPU/GPU does it natively; float32: exact")


def _add_decision_args(p: argparse.ArgumentParser) -> None:
    """The decision and cleanup options `segment` and `repick` share (core.decision)."""
    p.add_argument("--threshold", action="append", default=[], metavar="CLASS=P",
                   help="the probability (0-1] a voxel needs to be CLASS (repeatable); classes "
                        "not named win where they beat the background")
    p.add_argument("--min-size", action="append", default=[], metavar="CLASS=NM3",
                   help="CLASS's smallest kept component in nm^3 (repeatable)")
    p.add_argument("--min-length", action="append", default=[], metavar="CLASS=NM",
                   help="a filament CLASS's shortest traced filament in nm (repeatable)")


def _decision_values(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from ..core.decision import parse_class_values

    return {"thresholds": parse_class_values(args.threshold, "--threshold"),
            "min_size_nm3": parse_class_values(args.min_size, "--min-size"),
            "min_length_nm": parse_class_values(args.min_length, "--min-length")}


def _segment_options(args: argparse.Namespace):
    from ..core.infer import InferenceOptions
    from ..core.pipeline import SegmentOptions

    inference = InferenceOptions(device=args.device, tta_flips=args.tta,
                                 precision=args.precision)
    if args.batch_size:
        inference.batch_size = args.batch_size
    saved = getattr(args, "save_probabilities", None)
    return SegmentOptions(
        inference=inference, voxel_size_a=args.pixel_size_a,
        tilt_series_pattern=args.tilt_series_pattern or None,
        save_probabilities=(saved == "all" or tuple(
            name.strip() for name in saved.split(",") if name.strip())) if saved else False,
        specimen_mask=getattr(args, "specimen_mask", False),
        **_decision_values(args))


def _default_name_pattern() -> str:
    from ..core.star import WARP_RECONSTRUCTION_NAME

    return WARP_RECONSTRUCTION_NAME


def _name_pattern(text: str) -> str:
    from ..core.star import check_name_pattern

    try:
        return check_name_pattern(text) if text else ""
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


def load_model_or_default(path: Path | None):
    """The bundle at `path`, or the shipped default model."""
    from ..core.model import default_bundle_path, load_bundle

    bundle_path = path or default_bundle_path()
    if not Path(bundle_path).exists():
        raise CommandError(f"{bundle_path}: model file not found")
    return load_bundle(bundle_path)


def _refuse_shared_outputs(tomograms: Sequence[Path], out: Path) -> None:
    """One line, before any work, when two inputs from different folders would write the same
    output folder (a/TS_01.mrc and b/TS_01.mrc both into OUT/TS_01): the second would replace
    the first's result."""
    first: dict[str, Path] = {}
    for path in tomograms:
        stem = output_stem(path, out)
        if stem in first and first[stem].resolve() != path.resolve():
            raise CommandError(f"{first[stem]} and {path} would both write {out / stem}; "
                               "segment them into different --out folders")
        first.setdefault(stem, path)


def _cmd_segment(args: argparse.Namespace) -> int:
    from ..core.infer import prepare_network
    from ..core.pipeline import segment_file
    from .holds import stage_hold, with_progress, with_publish_hook

    if args.copick is not None:
        return _cmd_segment_copick(args)
    if (args.runs or args.copick_session or args.tomo_type or args.voxel_spacing_a
            or args.watch is not None):
        raise CommandError("--run, --copick-session, --tomo-type, --voxel-spacing and --watch "
                           "need --copick CONFIG.json")
    if not args.tomograms or args.out is None:
        raise CommandError("segment needs TOMO... and --out DIR (or --copick CONFIG.json)")
    if not args.claim:  # with --claim, --relative-to keeps the folders apart (batch.py)
        _refuse_shared_outputs(args.tomograms, args.out)
    bundle = load_model_or_default(args.model)
    options = _segment_options(args)
    _check_class_options(options, bundle)
    network = prepare_network(bundle, options.inference.device)
    print(f"model {bundle.meta.name} v{bundle.meta.version} ({bundle.sha256[:12]}) "
          f"at {bundle.meta.voxel_size_a:g} Å on {options.inference.device}", file=sys.stderr)
    if args.claim:
        from .batch import segment_with_claims

        return segment_with_claims(args.tomograms, args.out, bundle, network, options,
                                   lease_seconds=args.lease_seconds,
                                   relative_to=args.relative_to)
    def segment_one(path: Path, progress: Callable[[str, float], None]) -> tuple[Any, Path]:
        hold = stage_hold(path.stem)  # None unless a test switched holds on
        return segment_file(path, args.out, bundle, options, network=network,
                            stem=output_stem(path, args.out),
                            progress=with_progress(hold, progress),
                            before_publish=with_publish_hook(hold, None))

    return _each_with_a_line(args.tomograms, segment_one)


def _each_with_a_line(items: Sequence[Path],
                      run: Callable[[Path, Callable[[str, float], None]], tuple[Any, Path]]
                      ) -> int:
    """`run(item, progress) -> (segmentation, folder)` for each item with a progress bar, then
    its done line, or its one error line; EXIT_FAILED if any failed (the others still run)."""
    failures = 0
    for item in items:
        try:
            with _StageProgress(item.name) as progress:
                seg, out_dir = run(item, progress)
        except (ValueError, OSError, RuntimeError) as error:
            failures += 1
            print(f"tomolive: error: {one_line(error)}", file=sys.stderr)
            continue
        print(tomogram_done_line(seg, out_dir))
    return EXIT_FAILED if failures else EXIT_OK


def _check_class_options(options: Any, bundle: Any) -> None:
    """Options naming classes, checked against the model before any tomogram is read."""
    from ..core.decision import threshold_vector

    try:
        classes = options.classes_for(list(bundle.classes))
        threshold_vector(classes, options.thresholds)
        options.probability_classes(classes)
    except ValueError as error:
        raise CommandError(f"{bundle.path or bundle.meta.name}: {error}") from None


def _add_repick(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repick", help="redo a result's labels, particles and filaments from its "
                                      "saved probability maps, with new thresholds")
    p.add_argument("folders", nargs="+", metavar="OUT/STEM", type=Path,
                   help="result folders written with --save-probabilities")
    _add_decision_args(p)
    p.set_defaults(handler=_cmd_repick)


def _cmd_repick(args: argparse.Namespace) -> int:
    from ..core.repick import repick_folder

    values = _decision_values(args)
    return _each_with_a_line(args.folders, lambda folder, progress: repick_folder(
        folder, progress=progress, **values))


def _cmd_segment_copick(args: argparse.Namespace) -> int:
    """`segment --copick`: each run's tomogram in, its results back through copick; one line
    per run (the done line, or the error), exit status 1 if any run failed."""
    from ..core.export import write_outputs
    from ..core.infer import prepare_network
    from ..core.pipeline import segment
    from ..core.star import tilt_series_name
    from ..interop import copick as cp

    if args.tomograms:
        raise CommandError("--copick segments the project's runs: give runs with --run, "
                           "not tomogram files")
    if args.claim:
        raise CommandError("--claim does not apply to --copick")
    if args.pixel_size_a is not None:
        raise CommandError("--pixel-size does not apply to --copick (the voxel size is the "
                           "voxel spacing's; choose one with --voxel-spacing)")
    # Watching may start before the first run exists; a plain run needs one.
    project = cp.open_project(args.copick, require_runs=args.watch is None)
    bundle = load_model_or_default(args.model)
    session = (cp.check_session_id(args.copick_session) if args.copick_session else
               cp.default_session_id(bundle.meta.name, bundle.meta.version))
    options = _segment_options(args)
    _check_class_options(options, bundle)
    match = cp.match_objects(project, bundle.classes)
    network = prepare_network(bundle, options.inference.device)
    print(f"model {bundle.meta.name} v{bundle.meta.version} ({bundle.sha256[:12]}) "
          f"at {bundle.meta.voxel_size_a:g} Å on {options.inference.device}; copick "
          f"{args.copick} as {cp.USER_ID}/{session}", file=sys.stderr)
    for warning in match.warnings:
        print(f"warning: {one_line(warning)}", file=sys.stderr)
    def one(name: str, source=None, current=None) -> bool:
        """Segment run `name` (its tomogram `source`, when already chosen) and write back
        into `current` (the project as last opened; default: as opened here); one line
        either way; True when it worked."""
        target = current or project
        try:
            start = time.perf_counter()
            source = source or cp.find_tomogram(target, name, float(bundle.meta.voxel_size_a),
                                                args.voxel_spacing_a, args.tomo_type)
            timings_s: dict[str, float] = {}
            read_start = time.perf_counter()
            volume = cp.read_tomogram(source, options.voxel_size_bounds_a)
            timings_s["read"] = time.perf_counter() - read_start
            with _StageProgress(name) as progress:
                seg = segment(volume, bundle, options, network=network, progress=progress,
                              stem=name, timings_s=timings_s)
            if args.out is not None:  # STAR files name the tilt series after the run
                seg.tilt_series_name = tilt_series_name(name, options.tilt_series_pattern)
                write_outputs(args.out, seg, tomogram=volume.data, start_time=start)
            write_start = time.perf_counter()
            written = cp.write_results(target, source, seg, session, match)
            seg.timings_s["write"] = (seg.timings_s.get("write", 0.0)
                                      + time.perf_counter() - write_start)
        except (ValueError, OSError, RuntimeError) as error:
            print(f"tomolive: error: {one_line(error)}", file=sys.stderr, flush=True)
            return False
        destination = (f"copick {name} ({source.tomo_type} at {source.voxel_size_a:g} Å, "
                       f"{cp.USER_ID}/{session}: {len(written)} records)")
        print(tomogram_done_line(seg, destination), flush=True)
        return True

    if args.watch is not None:
        return _watch_copick(args, project, session, bundle, one)
    failures = sum(not one(name) for name in args.runs or project.run_names)
    return EXIT_FAILED if failures else EXIT_OK


def _watch_copick(args: argparse.Namespace, project, session: str, bundle,
                  one: Callable[..., bool]) -> int:
    """`segment --copick --watch S`: every S seconds, the runs (of --run, else all, new ones
    included) whose tomogram has no results under this session yet and has not changed since
    the previous look (still being written otherwise) are segmented. A failed tomogram is not
    retried until it changes. Runs until interrupted: SIGTERM finishes the tomogram in hand
    (its results written and reported) and stops; Ctrl-C stops at once."""
    import signal
    import threading

    from ..interop import copick as cp

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    seen: dict[str, tuple] = {}  # run -> the fingerprint at the previous look
    failed: dict[str, tuple] = {}  # run -> the fingerprint it failed with
    last_error = ""
    print(f"watching {args.copick} every {args.watch:g} s (Ctrl-C stops)", file=sys.stderr,
          flush=True)
    try:
        while not stopping.is_set():
            try:
                project = cp.open_project(args.copick, require_runs=False)  # new runs
                names = args.runs or project.run_names
            except ValueError as error:  # the config is being rewritten, say: look again
                if one_line(error) != last_error:  # once, not at every look
                    print(f"tomolive: error: {one_line(error)}", file=sys.stderr, flush=True)
                last_error, names = one_line(error), []
            else:
                last_error = ""
            for name in names:
                if stopping.is_set():
                    break
                try:
                    source = cp.find_tomogram(project, name, float(bundle.meta.voxel_size_a),
                                              args.voxel_spacing_a, args.tomo_type)
                    if cp.is_done(project, source, session):
                        continue
                    fingerprint = cp.tomogram_fingerprint(source)
                except ValueError:
                    continue  # no tomogram (yet)
                previous = seen.get(name)
                seen[name] = fingerprint
                if fingerprint is None or fingerprint != previous:
                    continue  # new or still changing: wait one more look
                if failed.get(name) == fingerprint:
                    continue
                if not one(name, source, project):
                    failed[name] = fingerprint
            stopping.wait(args.watch)
    except KeyboardInterrupt:
        pass
    print("tomolive: stopped watching", file=sys.stderr)
    return EXIT_OK


class _StageProgress:
    """A tqdm bar that follows the pipeline's (stage, fraction) callbacks."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None

    def __enter__(self) -> Callable[[str, float], None]:
        from tqdm import tqdm

        self.bar = tqdm(total=100, desc=self.label, unit="%", leave=False, file=sys.stderr,
                        disable=None, bar_format="{desc} {bar} {percentage:3.0f}% {postfix}")
        return self.update

    def update(self, stage: str, fraction: float) -> None:
        from ..core.stages import STAGES

        position = STAGES.index(stage) if stage in STAGES else 0
        inference = STAGES.index("inference")
        if stage == "inference":  # by far the longest stage: give it most of the bar
            overall = 30.0 + 55.0 * fraction
        elif position > inference:
            after = len(STAGES) - inference - 1
            overall = 85.0 + 15.0 * (position - inference - 1 + fraction) / after
        else:
            overall = 30.0 * (position + fraction) / inference
        self.bar.set_postfix_str(stage)
        self.bar.n = min(100.0, round(overall, 1))
        self.bar.refresh()

    def __exit__(self, *exc) -> None:
        self.bar.close()


# --- synth and evaluate -----------------------------------------------------------------------

def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic tomogram with its ground truth")
    p.add_argument("out", type=Path, metavar="OUT.mrc")
    p.add_argument("--labels", type=Path, metavar="L.mrc")
    p.add_argument("--particles", type=Path, metavar="P.csv")
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=(64, 256, 256))
    p.add_argument("--pixel-size", type=float, default=10.0, metavar="A", dest="pixel_size_a")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "int16", "float16"), default="float32",
                   help="storage type of the tomogram (int16 is scaled to use its range)")
    p.add_argument("--simulator", choices=("microscope", "cartoon"), default="microscope",
                   help="microscope: image formation as a TEM does it (default); cartoon: the "
                        "earlier filtered scene")
    p.add_argument("--tilt-range", type=float, metavar="DEG", dest="tilt_range_deg",
                   help="+- tilt range (default: drawn from 50-65)")
    p.add_argument("--tilt-step", type=float, metavar="DEG", dest="tilt_step_deg",
                   help="tilt increment (default: drawn from 1-4; microscope only)")
    p.add_argument("--defocus-um", type=float, metavar="UM", dest="defocus_um",
                   help="defocus in um, negative = underfocus (default: drawn from -1.5 to -6)")
    p.add_argument("--dose", type=float, metavar="E_PER_A2", dest="dose_e_per_a2",
                   help="total dose of the series in e/A^2 (default: drawn from 60-150)")
    p.add_argument("--thickness-nm", type=float, metavar="NM", dest="thickness_nm",
                   help="specimen (lamella) thickness (default: drawn from 80-300)")
    p.set_defaults(handler=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from ..core.synth import synthesize, write_synth

    start = time.perf_counter()
    result = synthesize(tuple(args.shape), args.pixel_size_a, args.seed,
                        simulator=args.simulator, tilt_range_deg=args.tilt_range_deg,
                        tilt_step_deg=args.tilt_step_deg, defocus_um=args.defocus_um,
                        dose_e_per_a2=args.dose_e_per_a2, thickness_nm=args.thickness_nm)
    write_synth(result, args.out, labels_path=args.labels, particles_csv=args.particles,
                dtype=args.dtype)
    print(f"{args.out}: synthetic tomogram {tuple(args.shape)} at {args.pixel_size_a:g} Å, "
          f"seed {args.seed}, {len(result.particles)} particles "
          f"({time.perf_counter() - start:.1f}s)")
    return EXIT_OK


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice per class and particle precision/recall/F1")
    p.add_argument("--pred", required=True, type=Path, metavar="LABELS.mrc")
    p.add_argument("--truth", required=True, type=Path, metavar="LABELS.mrc")
    p.add_argument("--pred-particles", type=Path, metavar="CSV")
    p.add_argument("--truth-particles", type=Path, metavar="CSV")
    p.add_argument("--classes", default=None,
                   help="class names in label order (default: the synthetic classes)")
    p.add_argument("--model", type=Path, help="take class names and diameters from a bundle")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..core.evaluate import evaluate_files, format_table

    class_specs = _evaluation_classes(args)
    result = evaluate_files(args.pred, args.truth, class_specs,
                            pred_particles=args.pred_particles,
                            truth_particles=args.truth_particles)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return EXIT_OK


def _evaluation_classes(args: argparse.Namespace):
    from ..core.classes import SYNTH_CLASS_NAMES, default_class

    if args.model:
        return load_model_or_default(args.model).classes
    names = args.classes.split(",") if args.classes else list(SYNTH_CLASS_NAMES)
    return [default_class(name.strip()) for name in names]


# --- train and distill ------------------------------------------------------------------------

def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from annotated slices of a tomogram")
    p.add_argument("--tomogram", required=True, type=Path, action="append", metavar="T",
                   help="repeat with --labels (and --region) for several tomograms")
    p.add_argument("--labels", required=True, type=Path, action="append", metavar="L")
    p.add_argument("--classes", required=True, metavar="NAME,NAME,...")
    p.add_argument("--out", required=True, type=Path, metavar="FILE")
    p.add_argument("--region", action="append", metavar="Z0:Z1,Y0:Y1,X0:X1")
    p.add_argument("--max-minutes", type=float, metavar="M")
    p.add_argument("--steps", type=int, metavar="N")
    p.add_argument("--device", default="auto")
    p.add_argument("--pixel-size", type=float, metavar="A", dest="pixel_size_a",
                   help="voxel size in Å of the tomograms, overriding their headers")
    p.add_argument("--model-pixel-size", type=float, metavar="A",
                   help="the model's voxel size (default: the first tomogram's)")
    p.add_argument("--class-config", type=Path, metavar="YAML",
                   help="per-class overrides (kind, diameter_nm, min_length_nm, ...)")
    p.add_argument("--init", metavar="default|MODEL",
                   help="fine-tune from a bundle: `default` is the shipped default model "
                        "(the recommended start for a few annotated slices)")
    p.add_argument("--name", default=None, help="model name (default: the output file's stem)")
    p.add_argument("--base-width", type=int, default=None)
    p.add_argument("--in-slices", type=int, default=None,
                   help="z-slices the network sees around each slice it labels (odd; default "
                        "from tomolive.core.training.TrainOptions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", choices=("final", "best"), default="final",
                   help="weights saved: at the end of the run (default) or those with the best "
                        "mean validation Dice")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="set a tuning field of tomolive.core.training.TrainOptions (repeat), "
                        "e.g. class_weight_power=0.5; for comparing recipes")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from ..core import training
    from ..core.model import save_bundle

    if args.steps is None and args.max_minutes is None:
        raise CommandError("give --steps N and/or --max-minutes M")
    if len(args.labels) != len(args.tomogram):
        raise CommandError("give one --labels per --tomogram")
    regions = args.region or []
    if regions and len(regions) != len(args.tomogram):
        raise CommandError("give one --region per --tomogram, or none")
    sources = [
        training.TrainingSource(tomogram_path=t, labels_path=lab,
                                region=training.parse_region(regions[i]) if regions else None,
                                voxel_size_a=args.pixel_size_a)
        for i, (t, lab) in enumerate(zip(args.tomogram, args.labels, strict=True))
    ]
    overrides = training.load_class_overrides(args.class_config) if args.class_config else {}
    class_specs = training.class_specs_for(
        [n.strip() for n in args.classes.split(",") if n.strip()], overrides)
    settings = dict(
        steps=args.steps, max_minutes=args.max_minutes, device=args.device, seed=args.seed,
        model_voxel_size_a=args.model_pixel_size, name=args.name or args.out.stem,
        keep=args.keep, **({"base_width": args.base_width} if args.base_width else {}),
        **({"in_slices": args.in_slices} if args.in_slices else {}),
    )
    # --option NAME=VALUE wins over a flag of its own (--keep, --base-width, --in-slices).
    options = training.TrainOptions(**{**settings, **_parsed_options(args.option)})
    init = None
    if args.init:
        init = load_model_or_default(None if args.init == "default" else Path(args.init))
    with _TrainingProgress(args.steps) as progress:
        trained = training.train(sources, class_specs, options, init_bundle=init,
                                 progress=progress, warn=_warn_line)
    save_bundle(args.out, trained.network, trained.meta)
    dice = trained.meta.training.get("validation_dice", {})
    kept = f"{trained.meta.training['kept']} weights, step {trained.meta.training['kept_step']}"
    print(f"{args.out}: {trained.meta.name} v{trained.meta.version} ({kept}), validation Dice "
          + " ".join(f"{k}={v:.2f}" for k, v in dice.items()))
    return EXIT_OK


def _parsed_options(texts: list[str]) -> dict:
    from ..core import training

    try:
        return dict(training.parse_option(text) for text in texts)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _warn_line(message: str) -> None:
    """A warning from training, on its own line above the progress bar."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


class _TrainingProgress:
    """A tqdm bar over training steps, showing the loss and the validation Dice per class."""

    def __init__(self, total_steps: int | None) -> None:
        self.total_steps = total_steps
        self.bar = None

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=self.total_steps, desc="training", unit="step", file=sys.stderr,
                        disable=None)
        return self.update

    def update(self, report) -> None:
        self.bar.n = report.step
        postfix = f"loss={report.loss:.3f}"
        if report.validation_dice:
            postfix += " dice " + " ".join(f"{k}={v:.2f}"
                                           for k, v in report.validation_dice.items())
        self.bar.set_postfix_str(postfix)
        self.bar.refresh()

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distill single-feature models into one joint model")
    p.add_argument("--models", required=True, nargs="+", type=Path, metavar="MODEL")
    p.add_argument("--tomograms", required=True, nargs="+", type=Path, metavar="T")
    p.add_argument("--out", required=True, type=Path, metavar="FILE")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--name", default=None)
    p.add_argument("--base-width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_distill)


def _cmd_distill(args: argparse.Namespace) -> int:
    from ..core import training
    from ..core.model import load_bundle, save_bundle
    from ..core.training import distill

    if args.steps is None and args.max_minutes is None:
        raise CommandError("give --steps N and/or --max-minutes M")
    singles = [load_bundle(path) for path in args.models]
    options = training.TrainOptions(
        steps=args.steps, max_minutes=args.max_minutes, device=args.device, seed=args.seed,
        name=args.name or args.out.stem,
        **({"base_width": args.base_width} if args.base_width else {}))
    with _TrainingProgress(args.steps) as progress:
        trained = distill(singles, args.tomograms, options, progress=progress,
                          warn=_warn_line)
    save_bundle(args.out, trained.network, trained.meta)
    print(f"{args.out}: joint model of {', '.join(c.name for c in trained.meta.classes)}")
    return EXIT_OK


# --- models -----------------------------------------------------------------------------------

def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list or validate model bundles")
    p.add_argument("action", choices=("list", "validate"))
    p.add_argument("path", nargs="?", type=Path, default=None,
                   help="a bundle or a folder (default: the configured models folder)")
    p.add_argument("--config", type=Path, default=None)
    p.set_defaults(handler=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from ..core.model import BundleError, default_bundle_path, load_bundle

    # The configured plausibility bounds, as the daemon's registry applies them.
    config = _load_config(args.config)
    target = args.path or config.models_dir
    paths = sorted(target.glob("*.safetensors")) if target.is_dir() else [target]
    if args.action == "list" and args.path is None:
        paths.append(default_bundle_path())
    bad = 0
    for path in paths:
        try:
            bundle = load_bundle(path, tuple(config.voxel_size_bounds_a))
            if args.action == "validate":
                from .model_registry import smoke_test

                smoke_test(bundle)
        except (BundleError, ValueError, OSError) as error:
            bad += 1
            print(f"INVALID {one_line(error)}")
            continue
        classes = ",".join(spec.name for spec in bundle.classes)
        print(f"ok {path}: {bundle.meta.name} v{bundle.meta.version} "
              f"{bundle.meta.voxel_size_a:g} Å [{classes}] sha256 {bundle.sha256[:12]}")
    if not paths:
        print(f"no model bundles in {target}")
    return EXIT_FAILED if bad else EXIT_OK


# --- the service ------------------------------------------------------------------------------

def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the daemon (watch, segment, publish metrics)")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML configuration; default: embedded defaults in the current folder")
    p.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from .service import run_service

    return run_service(args.config)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole service on synthetic tomograms")
    p.add_argument("--dir", type=Path, default=Path("tomolive-demo"),
                   help="demo folder (default ./tomolive-demo)")
    p.add_argument("--once", action="store_true", help="exit when the demo tomograms are done")
    p.add_argument("--count", type=int, default=3, help="number of synthetic tomograms")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dir, once=args.once, count=args.count)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="what the output folder says: done, running, failed")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import format_status, status_report

    report = status_report(_load_config(args.config))
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK


def _add_star_combine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("star-combine",
                       help="one STAR file per class for a session: DIR/<class>_particles.star")
    p.add_argument("folder", type=Path, metavar="DIR",
                   help="an output folder, or one session's folder in it")
    p.set_defaults(handler=_cmd_star_combine)


def _cmd_star_combine(args: argparse.Namespace) -> int:
    from ..core.star import StarError
    from .star_combine import combine_session_stars

    if not args.folder.is_dir():
        raise CommandError(f"{args.folder}: not a folder")
    try:
        written = combine_session_stars(args.folder)
    except (StarError, OSError) as error:
        raise CommandError(one_line(error)) from None
    if not written:
        raise CommandError(f"{args.folder}: no finished tomograms with STAR files below it")
    for path, rows in written.items():
        print(f"{path}: {rows} rows")
    return EXIT_OK


def _add_retry(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retry", help="clear the failure record of quarantined tomograms")
    p.add_argument("stem", nargs="?", help="a tomogram's stem (or its relative output path)")
    p.add_argument("--all", action="store_true")
    p.add_argument("--config", type=Path, default=None)
    p.set_defaults(handler=_cmd_retry)


def _cmd_retry(args: argparse.Namespace) -> int:
    from .failure_records import FailureRecords

    if not args.all and not args.stem:
        raise CommandError("give a tomogram STEM or --all")
    config = _load_config(args.config)
    records = FailureRecords(config.output_dir)
    cleared = records.retry(None if args.all else args.stem)
    print(f"cleared {cleared} failure record(s)")
    return EXIT_OK if cleared or args.all else EXIT_FAILED


# --- batch (Slurm) ----------------------------------------------------------------------------

def _add_batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="drain a backlog with a Slurm job array beside the daemons")
    actions = p.add_subparsers(dest="batch_command", metavar="ACTION", required=True)
    s = actions.add_parser("submit", help="write an array job script and submit it (sbatch)")
    s.add_argument("tomograms", nargs="+", metavar="TOMO", type=Path)
    s.add_argument("--out", required=True, type=Path, metavar="OUTPUT",
                   help="the output folder shared with the daemons")
    s.add_argument("--relative-to", required=True, type=Path, metavar="ROOT",
                   help="the daemons' watched root: outputs and leases follow the files' "
                        "folders below it")
    s.add_argument("--gpus-per-task", type=int, default=1, metavar="N",
                   help="GPUs per array task (--gres=gpu:N; 0 for CPU nodes; default 1)")
    s.add_argument("--partition", metavar="P")
    s.add_argument("--array-size", type=int, metavar="K",
                   help="array tasks (default 8, at most one per file)")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="passed to sbatch as one argument, e.g. --sbatch-arg=--time=12:00:00 "
                        "(repeat; overrides the script's #SBATCH lines)")
    s.add_argument("--model", type=Path, metavar="FILE",
                   help="model bundle; default: the shipped default model")
    s.add_argument("--lease-seconds", type=float, default=120.0, metavar="S",
                   help="must equal the daemons' lease_seconds (default 120)")
    s.set_defaults(handler=_cmd_batch_submit)
    t = actions.add_parser("status", help="done, running, failed, waiting for a job's files")
    t.add_argument("job_id", metavar="JOBID")
    t.add_argument("--out", type=Path, metavar="OUTPUT",
                   help="where to look for the job folder (default: ask Slurm)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(handler=_cmd_batch_status)


def _cmd_batch_submit(args: argparse.Namespace) -> int:
    from .slurm import SlurmError, SubmitRequest, submit

    request = SubmitRequest(
        tomograms=args.tomograms, out_dir=args.out, relative_to=args.relative_to,
        gpus_per_task=args.gpus_per_task, partition=args.partition,
        array_size=args.array_size, sbatch_args=args.sbatch_arg, model=args.model,
        lease_seconds=args.lease_seconds)
    try:
        job_id, job = submit(request)
    except SlurmError as error:
        raise CommandError(str(error)) from None
    print(f"submitted {len(args.tomograms)} tomograms as a {job.tasks}-task array: job "
          f"{job_id}, folder {job.job_dir}", file=sys.stderr)
    print(job_id)  # alone on stdout: JOB=$(tomolive batch submit ...)
    return EXIT_OK


def _cmd_batch_status(args: argparse.Namespace) -> int:
    from .slurm import SlurmError, format_job_status, job_status

    try:
        report = job_status(args.job_id, args.out)
    except SlurmError as error:
        raise CommandError(str(error)) from None
    print(json.dumps(report, indent=2) if args.json else format_job_status(report))
    return EXIT_OK


def _load_config(path: Path | None):
    from .config import load_config

    return load_config(path, Path.cwd())


