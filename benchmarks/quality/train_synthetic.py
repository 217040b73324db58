"""Train the small ReLU CNN of the synthetic localisation set, on the CPU, from a fixed seed.

    python benchmarks/quality/train_synthetic.py            # a few minutes on 2 CPU cores

Writes ``handler/models/synthetic_digits_cnn.pt`` (the state dict the built-in
model spec ``synthetic_digits_cnn`` loads) and
``benchmarks/quality/results/synthetic_training.json`` (accuracy, time, machine).
Every epoch draws fresh images from the generator (train split: digits never
used by the test split), so the network cannot memorise backgrounds. The
background contrast ramps up over the first epochs (a curriculum: on full-contrast
textures from the start, a network this small sits at chance for hundreds of
steps); the last epochs and the test set use the generator's default contrast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_revision, machine  # noqa: E402
from handler.evaluation.synthetic import SyntheticDigits  # noqa: E402
from handler.models import get_spec  # noqa: E402
from handler.models.architectures import ARCHITECTURES  # noqa: E402

SPEC = "synthetic_digits_cnn"


def evaluate(model, data: SyntheticDigits, mean, std, batch_size: int = 250) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            x, y, _ = data.batch(range(start, min(len(data), start + batch_size)), mean, std)
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(data)


def contrast_at(epoch: int, ramp_epochs: int, final: tuple) -> tuple:
    """The background contrast range for ``epoch``: from flat backgrounds up to ``final`` after the ramp."""
    share = min(1.0, (epoch + 1) / (ramp_epochs + 1))
    return (round(final[0] * share, 4), round(final[1] * share, 4))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--per-epoch", type=int, default=6000, help="fresh training images per epoch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ramp-epochs", type=int, default=3, help="epochs over which the background contrast ramps up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--test-count", type=int, default=1000)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    spec = get_spec(SPEC)
    arch = spec.architecture.split(":", 1)[1]
    model = ARCHITECTURES.get(arch)(len(spec.labels))
    mean, std = spec.preprocessing.mean, spec.preprocessing.std
    size = spec.preprocessing.crop
    test = SyntheticDigits("test", args.test_count, size=size, seed=args.seed)
    steps = args.epochs * (args.per_epoch // args.batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    history = []
    started = time.perf_counter()
    for epoch in range(args.epochs):
        # Disjoint image indices per epoch: every epoch sees new placements, textures and colours.
        train = SyntheticDigits("train", (epoch + 1) * args.per_epoch, size=size, seed=args.seed,
                                texture_contrast=contrast_at(epoch, args.ramp_epochs, test.texture_contrast))
        order = torch.randperm(args.per_epoch) + epoch * args.per_epoch
        model.train()
        total, seen = 0.0, 0
        for start in range(0, args.per_epoch - args.batch_size + 1, args.batch_size):
            x, y, _ = train.batch(order[start:start + args.batch_size].tolist(), mean, std)
            loss = F.cross_entropy(model(x), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(y)
            seen += len(y)
        accuracy = evaluate(model, test, mean, std)
        history.append({"epoch": epoch + 1, "texture_contrast": list(train.texture_contrast), "train_loss": round(total / seen, 4), "test_accuracy": accuracy,
                         "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(history[-1]), flush=True)

    model.eval()
    weights = spec.resolve(spec.weights.file)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, weights)
    record = {
        "model": SPEC, "weights": str(weights.relative_to(ROOT)), "bytes": weights.stat().st_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_accuracy": history[-1]["test_accuracy"], "test_images": args.test_count,
        "train_seconds": history[-1]["seconds"], "history": history, "options": vars(args),
        "machine": machine(), "revision": git_revision(),
    }
    out = ROOT / "benchmarks" / "quality" / "results" / "synthetic_training.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"test accuracy {record['test_accuracy']:.3f}; wrote {weights} ({record['bytes']} bytes) and {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
