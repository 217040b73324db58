"""Real photos available offline: the colour photographs shipped inside scikit-image."""

from __future__ import annotations

from pathlib import Path

#: name -> file in scikit-image's data folder, with the ImageNet classes a correct model should see.
SAMPLE_PHOTOS = {
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
    "astronaut": "astronaut.png",
    "rocket": "rocket.jpg",
    "motorcycle_left": "motorcycle_left.png",
}


def sample_dir() -> Path:
    try:
        import skimage
    except ImportError:
        raise RuntimeError("the sample photos come with scikit-image: pip install scikit-image") from None
    return Path(skimage.__file__).parent / "data"


def sample_photo(name: str) -> Path:
    return sample_dir() / SAMPLE_PHOTOS[name]


def sample_photos() -> list:
    return [sample_photo(name) for name in SAMPLE_PHOTOS]


def main(argv=None) -> int:
    """``python -m handler.samples [NAME ...]``: the paths of the named sample photos (all without names),
    space-separated on one line, for ``PHOTO=$(...)`` and ``$(...)`` in a shell."""
    import sys

    names = list(sys.argv[1:] if argv is None else argv)
    unknown = [n for n in names if n not in SAMPLE_PHOTOS]
    if unknown:
        print(f"unknown sample photo {unknown[0]!r}; the samples are {', '.join(SAMPLE_PHOTOS)}", file=sys.stderr)
        return 2
    try:
        print(" ".join(str(sample_photo(n)) for n in names or SAMPLE_PHOTOS))
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
