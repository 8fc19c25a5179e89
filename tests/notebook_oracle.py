"""The seed notebook's caption rules, kept verbatim as the oracle that tests compare against.

A plain module beside the tests (pytest puts ``tests/`` on ``sys.path``): imported by
test_morphology and test_prepare, never collected itself."""


def notebook_describe(r):
    """The seed notebook's describe(), verbatim (indentation restored): the caption oracle."""
    out = []
    # ============ turn labels into words for captions =======================
    smooth = r["smooth-or-featured-gz2_smooth_fraction"] > 0.6
    if smooth:
        out.append("This is an image of an elliptical galaxy")
        # axis ratio
        if r["how-rounded-gz2_round_fraction"] > .5:
            out.append("nearly round in shape")
        elif r["how-rounded-gz2_in-between_fraction"] > .5:
            out.append("moderately elongated in shape")
        elif r["how-rounded-gz2_cigar_fraction"] > .5:
            out.append("highly elongated in shape")
    else:
        out.append("This is an image of a spiral galaxy")
        if r["bar-gz2_yes_fraction"] > .5:
            out.append("with a central bar")
        if r["spiral-arm-count-gz2_2_fraction"] > .5:
            out.append("with two arms")
        elif r["spiral-arm-count-gz2_3_fraction"] > .5:
            out.append("with three arms")
        elif r["spiral-arm-count-gz2_more-than-4_fraction"] > .5:
            out.append("with many arms")
    # bulge prominence / shape
    if r["bulge-size-gz2_obvious_fraction"] > .5:
        out.append("prominent bulge at its center")
    if r["bulge-shape-gz2_boxy_fraction"] > .5:
        out.append("boxy bulge at its center")
    # mergers / oddities
    if r["something-odd-gz2_yes_fraction"] > .4:
        out.append("disturbed or merging with another galaxy")
    return ", ".join(out) + "."
