"""What a caption says: the :class:`Morphology` attributes, the caption grammar that renders
them, and :func:`parse_caption`, the one parser of captions (metrics and report read answers
through it).

Pure functions, no I/O. The rule sets that build a Morphology from GZ2 votes live in
:mod:`galaxy_llava.rules`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, NamedTuple

ATTRIBUTES = ("type", "shape", "bar", "arms", "prominent_bulge", "boxy_bulge", "disturbed")
TYPES = ("elliptical", "spiral", "edge-on disk", "artifact")
SHAPES = ("round", "in-between", "cigar")
ARMS = ("2", "3", "many")

# The caption grammar: one opening clause naming the type, then attribute phrases in a fixed
# order, joined by ", " and closed by ".".
TYPE_PHRASES = {
    "elliptical": "This is an image of an elliptical galaxy",
    "spiral": "This is an image of a spiral galaxy",
    "edge-on disk": "This is an image of an edge-on disk galaxy",
    "artifact": "This is an image of a star or artifact",
}
SHAPE_PHRASES = {
    "round": "nearly round in shape",
    "in-between": "moderately elongated in shape",
    "cigar": "highly elongated in shape",
}
BAR_PHRASE = "with a central bar"
ARM_PHRASES = {"2": "with two arms", "3": "with three arms", "many": "with many arms"}
PROMINENT_BULGE_PHRASE = "prominent bulge at its center"
BOXY_BULGE_PHRASE = "boxy bulge at its center"
DISTURBED_PHRASE = "disturbed or merging with another galaxy"


class Phrase(NamedTuple):
    """One phrase of a caption and what it states; ``attribute`` is None where the grammar reads
    nothing in it."""

    text: str
    attribute: str | None
    value: Any = None


@dataclass(frozen=True)
class Morphology:
    """The attributes a caption states. ``unparsed`` holds caption text the grammar did not match."""

    type: str = "spiral"
    shape: str | None = None
    bar: bool = False
    arms: str | None = None
    prominent_bulge: bool = False
    boxy_bulge: bool = False
    disturbed: bool = False
    unparsed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"unknown galaxy type {self.type!r}; expected one of {TYPES}")
        if self.shape is not None and self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.arms is not None and self.arms not in ARMS:
            raise ValueError(f"unknown arm count {self.arms!r}; expected one of {ARMS}")

    @property
    def parsed_ok(self) -> bool:
        """True when the whole caption was inside the grammar."""
        return not self.unparsed

    def to_dict(self) -> dict[str, Any]:
        """The attributes as a JSON-ready dict (without ``unparsed``)."""
        d = asdict(self)
        d.pop("unparsed")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Morphology":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown morphology keys: {sorted(extra)}")
        d = dict(d)
        if "unparsed" in d:
            d["unparsed"] = tuple(d["unparsed"])
        return cls(**d)

    def phrases(self) -> list[Phrase]:
        """The caption's phrases in grammar order, each with the attribute and value it states
        (the report marks an answer phrase by phrase against these)."""
        out = [Phrase(TYPE_PHRASES[self.type], "type", self.type)]
        if self.shape:
            out.append(Phrase(SHAPE_PHRASES[self.shape], "shape", self.shape))
        if self.bar:
            out.append(Phrase(BAR_PHRASE, "bar", True))
        if self.arms:
            out.append(Phrase(ARM_PHRASES[self.arms], "arms", self.arms))
        if self.prominent_bulge:
            out.append(Phrase(PROMINENT_BULGE_PHRASE, "prominent_bulge", True))
        if self.boxy_bulge:
            out.append(Phrase(BOXY_BULGE_PHRASE, "boxy_bulge", True))
        if self.disturbed:
            out.append(Phrase(DISTURBED_PHRASE, "disturbed", True))
        return out

    def caption(self) -> str:
        """Render the attributes with the caption grammar."""
        return ", ".join(p.text for p in self.phrases()) + "."


# ---------------------------------------------------------------- parsing

def value_label(m: "Morphology", attribute: str) -> str:
    """An attribute's value as one lower-case label (``none``, ``true``, ``2``, ``cigar``): how
    the grammar's marginals and the catalogue's columns name it."""
    value = getattr(m, attribute)
    return "none" if value is None else str(value).lower()


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


# normalised phrase -> (attribute, value): type clauses (read first only), attribute phrases
_TYPE_CLAUSES = {_norm(p): ("type", t) for t, p in TYPE_PHRASES.items()}
_PHRASES: dict[str, tuple[str, Any]] = {
    **{_norm(p): ("shape", s) for s, p in SHAPE_PHRASES.items()},
    _norm(BAR_PHRASE): ("bar", True),
    **{_norm(p): ("arms", a) for a, p in ARM_PHRASES.items()},
    _norm(PROMINENT_BULGE_PHRASE): ("prominent_bulge", True),
    _norm(BOXY_BULGE_PHRASE): ("boxy_bulge", True),
    _norm(DISTURBED_PHRASE): ("disturbed", True),
}


def caption_phrases(text: str | None) -> tuple[list[Phrase], str]:
    """Split a caption into its phrases, as written (stripped), each read by the grammar, and
    return them with the text after the first full stop (which the grammar ignores).

    Case and spacing do not matter. Only the first phrase may be a type clause, and an
    attribute is read once: a phrase outside the grammar, a first phrase that is not a type
    clause, or a second value for an attribute read already gets ``attribute=None``."""
    body, _, rest = (text or "").partition(".")
    phrases: list[Phrase] = []
    read: set[str] = set()
    for k, raw in enumerate(body.split(",")):
        hit = (_TYPE_CLAUSES if k == 0 else _PHRASES).get(_norm(raw))
        if hit is None or hit[0] in read:
            phrases.append(Phrase(raw.strip(), None))
        else:
            read.add(hit[0])
            phrases.append(Phrase(raw.strip(), *hit))
    return phrases, rest


def parse_caption(text: str | None) -> Morphology:
    """Invert the caption grammar, tolerant of case, spacing and text after the first full stop.

    Phrases outside the grammar, a missing or unknown type clause, and a second value for an
    attribute already set are listed in ``unparsed`` (lower-cased, spaces collapsed); the result
    is then not ``parsed_ok``. A caption without a type clause defaults to ``spiral`` (the
    grammar's "else" branch).
    """
    phrases, _ = caption_phrases(text)
    values = {p.attribute: p.value for p in phrases if p.attribute is not None}
    unparsed = tuple(_norm(p.text) for p in phrases if p.attribute is None)
    return Morphology(**values, unparsed=unparsed)


def has_type_clause(text: str | None) -> bool:
    """Whether a text opens with a type clause, i.e. is a caption at all (an answer without one
    earns no credit for the grammar's defaults; see ``metrics.read_answer``)."""
    return caption_phrases(text)[0][0].attribute == "type"
