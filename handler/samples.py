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


if __name__ == "__main__":
    print(" ".join(str(p) for p in sample_photos()))
