"""The report's grid of galaxies: each answer's phrases marked right, wrong or left out, read
as the metrics read them."""

from __future__ import annotations

from galaxy_llava.metrics import read_answer
from galaxy_llava.morphology import Morphology
from galaxy_llava.report_galaxies import marked_answer


def test_marked_answer_flags_wrong_and_missing_phrases():
    truth = Morphology("spiral", bar=True, arms="2").to_dict()
    text = "This is an image of a spiral galaxy, with three arms, purple."
    marked = marked_answer(text, truth)
    assert '<span class="ok">This is an image of a spiral galaxy</span>' in marked
    assert '<span class="bad">with three arms</span>' in marked
    assert '<span class="bad">purple</span>' in marked
    assert '<span class="miss">with a central bar</span>' in marked
    assert '<span class="miss">with two arms</span>' in marked
    perfect = marked_answer(Morphology.from_dict(truth).caption(), truth)
    assert "bad" not in perfect and "miss" not in perfect
    assert "empty" in marked_answer("", truth)


def test_marked_answer_reads_phrases_as_the_metrics_do():
    """An answer that does not open with a type clause is no caption: the metrics count every
    attribute wrong, so the report marks none of its phrases right."""
    truth = Morphology("spiral", bar=True)
    text = "With a central bar, This is an image of a spiral galaxy."
    assert set(read_answer(text)[0].values()) == {"unknown"}
    marked = marked_answer(text, truth.to_dict())
    assert 'class="ok"' not in marked and '<span class="miss">with a central bar</span>' in marked
