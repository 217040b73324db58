"""``pathway-eval``: evaluate explanation methods on a model with pixel-perturbation, sanity and localisation protocols.

Writes ``results.json`` (every number, per image too, with the settings, the
machine and the revision) and ``summary.md`` (tables) into ``--out``; with
``--save-maps`` also ``maps.npz`` (the maps and the images they explain).

Exit status: 0 done; 2 a bad option, method, protocol, model or image, before
any evaluation work.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..commands import parse_device, run_main
from ..engine import METHODS, REDUCTIONS, SELECTIONS
from ..errors import ExplainError, UsageError
from ..imaging import Preprocessor
from ..models import ModelLoadError, builtin_names, load_model
from .maps import MethodVariant, all_variants
from .perturbation import FRACTIONS, RISE_STEP
from .provenance import provenance
from .suite import (PROTOCOLS, EvaluationConfig, default_overlap_selections, evaluate, parse_overlap_selection,
                    photo_set, synthetic_set)
from .tables import summary_markdown

PROG = "pathway-eval"

EPILOG = """\
method variants: METHOD[@SELECTION][:NAME=VALUE,...], e.g. gradient, pathway_gradient@random,
  pathway_gradient:signed=true. 'all' means every registered method, pathway methods once per selection.
examples:
  pathway-eval --samples --method gradient --method pathway_gradient --protocol lerf_morf --out out/eval
  pathway-eval --model synthetic_digits_cnn --synthetic 500 --target label --method all \\
               --protocol pointing_game --out out/synthetic
  pathway-eval --samples --protocol pathway_overlap --selection contribution --selection random --out out/overlap
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files to evaluate on")
    src = p.add_argument_group("images (one source)")
    src.add_argument("--samples", action="store_true",
                     help="the colour photos shipped inside scikit-image (coffee, chelsea, astronaut, rocket, "
                          "motorcycle_left)")
    src.add_argument("--synthetic", type=int, metavar="N",
                     help="the first N images of the synthetic localisation set's test split (digits on "
                          "textures, with boxes); needs a model trained on it (synthetic_digits_cnn)")
    p.add_argument("--out", type=Path, help="output directory (created if missing)")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="efficientnet_lite0",
                       help=f"built-in model ({', '.join(builtin_names())}) or a model spec .json "
                            "(default: efficientnet_lite0)")
    model.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    what = p.add_argument_group("what to evaluate")
    what.add_argument("--method", action="append", default=[], metavar="VARIANT",
                      help="a method variant (repeatable; see below); default: all")
    what.add_argument("--protocol", action="append", default=[], metavar="NAME",
                      help=f"repeatable: {', '.join(PROTOCOLS)}; default: lerf_morf and insertion_deletion "
                           "(plus pointing_game on --synthetic)")
    what.add_argument("--target", default="auto",
                      help="class explained: auto (predicted), label (ground truth, --synthetic), or an index")
    what.add_argument("--sparsity", type=float, default=None, help="pathway sparsity (default: the model's)")
    what.add_argument("--reduce", default=None, help=f"channel reduction: {', '.join(REDUCTIONS.names())}")
    what.add_argument("--selection", action="append", default=[], metavar="NAME[:OPT=VAL,...]",
                      help="pathway_overlap: selection strategies to compare, the first is the reference "
                           "(repeatable; default: every registered one, contribution first)")
    proto = p.add_argument_group("protocol settings")
    proto.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS),
                       help="lerf_morf: fractions of pixels removed (default 0.01,...,0.1)")
    proto.add_argument("--step", type=int, default=RISE_STEP, help="insertion_deletion: pixels per step (224)")
    proto.add_argument("--tolerance", type=float, default=None,
                       help="pointing_game: tolerance in pixels (default 15 at 224 px, scaled to the image size)")
    proto.add_argument("--stages", type=int, default=None,
                       help="randomisation: stop after this many stages from the logits (default: all)")
    run = p.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    run.add_argument("--seed", type=int, default=0, help="tie-breaking, randomisation and synthetic-set seed")
    run.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    run.add_argument("--save-maps", action="store_true", help="also write maps.npz (maps, images, boxes)")
    run.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--list", action="store_true", help="list models, methods, selections and protocols, and exit")
    return p


def _fractions(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--fractions takes numbers separated by commas, not {text!r}") from None
    if not values or not all(0 < v < 1 for v in values):
        raise UsageError(f"--fractions must be numbers in (0, 1), got {text!r}")
    return values


def _variants(items: Sequence[str]) -> list:
    out = []
    for item in items or ["all"]:
        out.extend(all_variants() if item.strip() == "all" else [MethodVariant.parse(item)])
    return out


def _target(text: str):
    text = text.strip()
    if text in ("auto", "label"):
        return text
    return int(text) if text.lstrip("-").isdigit() else text


def _list() -> None:
    print("models:     " + ", ".join(builtin_names()))
    print("methods:    " + ", ".join(METHODS.names()))
    print("selections: " + ", ".join(SELECTIONS.names()))
    print("variants (--method all): " + ", ".join(v.label for v in all_variants()))
    print("protocols:")
    for name, text in PROTOCOLS.items():
        print(f"  {name}: {text}")


def run(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        _list()
        return 0
    sources = sum([bool(args.images), args.samples, args.synthetic is not None])
    if sources != 1:
        parser.error("give exactly one image source: IMAGE files, --samples or --synthetic N")
    if args.out is None:
        parser.error("--out DIR is required")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.synthetic is not None and args.synthetic < 1:
        parser.error("--synthetic N needs N >= 1")
    if args.step < 1:
        parser.error("--step must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    protocols = args.protocol or (["lerf_morf", "insertion_deletion"]
                                  + (["pointing_game"] if args.synthetic is not None else []))
    try:
        unknown = [p for p in protocols if p not in PROTOCOLS]
        if unknown:
            raise UsageError(f"unknown protocol {unknown[0]!r}; choose from: {', '.join(PROTOCOLS)}")
        if "pointing_game" in protocols and args.synthetic is None:
            raise UsageError("the pointing game needs ground-truth boxes: evaluate on --synthetic N")
        if args.target == "label" and args.synthetic is None:
            raise UsageError("--target label needs ground-truth labels: evaluate on --synthetic N")
        if args.sparsity is not None and not 0 <= args.sparsity < 1:
            raise UsageError(f"--sparsity must be in [0, 1), got {args.sparsity}")
        if args.reduce is not None and args.reduce not in REDUCTIONS:
            raise UsageError(f"unknown reduction {args.reduce!r}; choose one of: {', '.join(REDUCTIONS.names())}")
        config = EvaluationConfig(
            methods=_variants(args.method), protocols=protocols, target=_target(args.target),
            sparsity=args.sparsity, reduce=args.reduce, fractions=_fractions(args.fractions), step=args.step,
            tolerance=args.tolerance, stages=args.stages,
            overlap_selections=[parse_overlap_selection(s) for s in args.selection] or default_overlap_selections(),
            batch_size=args.batch_size, seed=args.seed)
        if args.stages is not None and args.stages < 1:
            raise UsageError("--stages must be at least 1")
        for path in args.images:
            if not Path(path).is_file():
                raise UsageError(f"{path}: no such file")
        device = parse_device(args.device)
        loaded = load_model(args.model, device=device, prepare=False)  # randomisation resets BatchNorms too
        preprocessor = Preprocessor(loaded.spec.preprocessing)
        if args.synthetic is not None:
            images = synthetic_set(args.synthetic, preprocessor, seed=args.seed)
        else:
            from ..samples import sample_photos

            images = photo_set(sample_photos() if args.samples else args.images, preprocessor)
        record, maps = evaluate(loaded, images, config, device=device, show_progress=not args.quiet,
                                keep_maps=args.save_maps)
    except (ExplainError, ModelLoadError, UsageError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2

    record["command"] = " ".join([PROG] + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
    record["provenance"] = provenance()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "summary.md").write_text(summary_markdown(record))
    if args.save_maps:
        arrays = {"images": images.display, "names": np.array(images.names),
                  "targets": np.array(record["images"]["targets"])}
        if images.boxes is not None:
            arrays["boxes"] = np.array([b.to_list() for b in images.boxes])
        for i, (label, m) in enumerate(maps.items()):
            arrays[f"map{i}"] = m.attribution.astype(np.float16)
        arrays["methods"] = np.array(list(maps))
        np.savez_compressed(args.out / "maps.npz", **arrays)
    print(f"{PROG}: wrote {args.out / 'results.json'} and {args.out / 'summary.md'}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(run, argv, prog=PROG)


if __name__ == "__main__":
    main()
