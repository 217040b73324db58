"""A model's classes, and the class a request names: an index, a label, or none (the predicted class)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

from ..errors import InvalidTarget, shown

Target = Union[int, str, None]


class ClassNames:
    """The class names a model has (``None``: none, indices only), and the one rule for naming a target."""

    def __init__(self, labels: Optional[Sequence[str]] = None, aliases: Optional[dict] = None):
        """``aliases``: extra names that stand for several classes (a class renamed to tell it from another
        keeps matching its original name, which then names both and is refused as ambiguous)."""
        self.labels = list(labels) if labels is not None else None
        self._index: dict = {}
        for i, name in enumerate(self.labels or ()):
            self._index.setdefault(name.lower(), []).append(i)
        self._aliases = {name.lower() for name in aliases or ()} if self.labels else set()
        for name, indices in (aliases or {}).items() if self.labels else ():
            hits = self._index.setdefault(name.lower(), [])
            hits.extend(i for i in indices if i not in hits and 0 <= i < len(self.labels))
            hits.sort()

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.labels) if self.labels else None

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels else str(index)

    def resolve(self, target: Target) -> int:
        """A class index (or ``-1`` for "the predicted class") from an index or a label name."""
        if target is None or (isinstance(target, str) and target.strip().lower() in ("", "auto", "predicted")):
            return -1
        if isinstance(target, bool):
            raise InvalidTarget(f"target must be a class index or a label name, not {shown(target)}")
        if isinstance(target, str):
            text = target.strip()
            digits = text[1:] if text.startswith("-") else text
            if digits.isascii() and digits.isdigit():  # not "²" or "٣", which isdigit() also accepts
                if len(digits) > 18:  # far out of range; int() of thousands of digits would raise
                    raise InvalidTarget(f"target {text[:24]}… is out of range", code="target_out_of_range")
                return self.resolve(int(text))
            hits = self._index.get(text.lower())
            if not hits:
                raise InvalidTarget(f"unknown class label {shown(text)}" + (
                    "" if self.labels else " (this model has no class names; give a class index)"),
                    code="unknown_label")
            exact = [i for i in hits if self.labels[i] == text]
            if len(hits) > 1 and len(exact) == 1 and text.lower() not in self._aliases:
                return exact[0]  # "Cardigan" (the corgi) and "cardigan" (the sweater) differ only in case
            if len(hits) > 1:
                named = ", ".join(f"{i} {self.labels[i]!r}" for i in hits)
                raise InvalidTarget(f"class label {shown(text)} names several classes ({named}); give the index "
                                    "or the full label", code="ambiguous_label")
            return hits[0]
        if isinstance(target, float) and target.is_integer():
            target = int(target)
        if not isinstance(target, int):
            raise InvalidTarget(f"target must be a class index or a label name, not {shown(target)}")
        limit = self.num_classes
        if target < 0 or (limit is not None and target >= limit):
            bound = f"0..{limit - 1}" if limit is not None else "a non-negative index"
            raise InvalidTarget(f"target {shown(target, 24)} is out of range: this model's classes are {bound}",
                                code="target_out_of_range")
        return target
