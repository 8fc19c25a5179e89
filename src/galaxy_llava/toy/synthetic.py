"""Synthetic Galaxy Zoo 2 catalogue: GalSim-rendered galaxies with known truth and simulated votes.

Every code path (catalogue reading, selection, captions, training, evaluation) can then run offline
on data whose right answer is known. Each galaxy gets a drawn truth (:data:`TRUTH_MIX`), an SDSS-like
gri colour image (GalSim profiles, a seeing PSF, sky noise, Lupton asinh stretch) and GZ2 volunteer
votes that walk the decision tree with realistic confusion, split more where the picture is
fainter, smaller or more inclined (votes.py). Spiral arms are an image-space
log-spiral modulation of the GalSim disk (GalSim has no spiral profile). Colours come from
per-component g:r:i flux ratios under one PSF (the PSF's colour dependence is ignored).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import galsim
import numpy as np
import scipy.fft
from PIL import Image

from galaxy_llava import outputs
from galaxy_llava.errors import UserError
from galaxy_llava.io import write_json
from galaxy_llava.gz2 import vote_columns
from galaxy_llava.morphology import Morphology
from galaxy_llava.rules import rule_set
from galaxy_llava.toy.votes import simulate_votes, unanimous_votes

# Share of each type, then of each attribute within its type. "disturbed" applies to every type
# but artifacts, split between a close companion and tidal distortion.
TRUTH_MIX = {
    "type": {"elliptical": 0.45, "spiral": 0.40, "edge-on disk": 0.10, "artifact": 0.05},
    "shape": {"round": 0.40, "in-between": 0.40, "cigar": 0.20},  # ellipticals
    "bar": 0.30,  # face-on disks
    "arms": {"2": 0.35, "3": 0.20, "many": 0.25, None: 0.20},  # face-on disks
    "bulge": {"no": 0.25, "just-noticeable": 0.35, "obvious": 0.40},  # all disks
    "winding": {"tight": 0.3, "medium": 0.4, "loose": 0.3},
    "boxy": 0.35,  # edge-on disks that have a bulge
    "artifact": {"star": 0.6, "trail": 0.4},
    "disturbed": 0.105,  # of non-artifacts, so ~10% overall
    "disturbance": {"companion": 0.6, "tidal": 0.4},
}
MIN_IMAGE_SIZE = 32
SYNTH_FORMAT = "galaxy-llava-synth/1"
WIDTH = 424.0  # world units: all geometry is in pixels of a 424 px GZ2 cutout, whatever image_size
# g:r:i flux ratios: old stars (ellipticals, bulges, bars) are redder than disks and arms.
RED, DISK, BLUE = np.array([0.55, 1.0, 1.3]), np.array([0.9, 1.0, 1.0]), np.array([1.3, 1.0, 0.8])


def _pick(rng: np.random.Generator, mix: dict):
    keys = list(mix)
    return keys[rng.choice(len(keys), p=np.array(list(mix.values())) / sum(mix.values()))]


def draw_truth(rng: np.random.Generator) -> dict:
    """Draw one galaxy's truth (the attributes a caption states, plus a few rendering choices)."""
    m = TRUTH_MIX
    t = {"type": _pick(rng, m["type"]), "shape": None, "bar": False, "arms": None, "bulge": None,
         "boxy": False, "disturbed": False, "winding": None, "disturbance": None, "artifact": None,
         "axis_ratio": None}
    if t["type"] == "elliptical":
        t["shape"] = _pick(rng, m["shape"])
        lo, hi = {"round": (0.8, 1.0), "in-between": (0.45, 0.75), "cigar": (0.25, 0.42)}[t["shape"]]
        t["axis_ratio"] = round(float(rng.uniform(lo, hi)), 3)
    elif t["type"] == "spiral":
        t.update(bar=bool(rng.random() < m["bar"]), arms=_pick(rng, m["arms"]),
                 bulge=_pick(rng, m["bulge"]), axis_ratio=round(float(rng.uniform(0.55, 1)), 3))
        t["winding"] = _pick(rng, m["winding"]) if t["arms"] else None
    elif t["type"] == "edge-on disk":
        t["bulge"] = _pick(rng, m["bulge"])
        t["boxy"] = bool(t["bulge"] != "no" and rng.random() < m["boxy"])
    else:
        t["artifact"] = _pick(rng, m["artifact"])
    if t["type"] != "artifact" and rng.random() < m["disturbed"]:
        t["disturbed"], t["disturbance"] = True, _pick(rng, m["disturbance"])
    return t


def truth_morphology(truth: dict, rules: str = "reference") -> Morphology:
    """The Morphology a rule set should give a galaxy with this truth, if volunteers agreed on it:
    the rule set applied to unanimous votes, so a new rule set needs nothing here."""
    return rule_set(rules).morphology(unanimous_votes(truth))


# ---------------------------------------------------------------- rendering

def _rotate(x, y, angle):
    ca, sa = math.cos(angle), math.sin(angle)
    return x * ca + y * sa, -x * sa + y * ca


def _project(obj: galsim.GSObject, q: float, pa: float, angle: float = 0.0) -> galsim.GSObject:
    """Turn ``obj`` by ``angle`` in the disk plane, incline it to axis ratio q, then turn it to PA."""
    return (obj.rotate(angle * galsim.radians).transform(1, 0, 0, q)
            .rotate(pa * galsim.radians).withFlux(obj.flux))


def _tail(rng, start, angle, length, width, flux, curl):
    """Points, widths and fluxes of a smooth curved tidal tail leaving ``start``."""
    s = np.linspace(0.1, 1, 48)
    ang = angle + curl * s
    pts = np.stack([start[0] + length * s * np.cos(ang), start[1] + length * s * np.sin(ang)], 1)
    pts += rng.normal(0, 0.015 * length, pts.shape)
    return pts, width * (0.7 + s), flux * np.exp(-1.5 * s) / len(s)


def _spiral(xd, yd, rd, m, pitch_deg, phase0, r_in):
    """Log-spiral arm pattern (mean ~1) and its radial taper, on disk-plane coordinates."""
    r = np.hypot(xd, yd) + 1e-6
    phase = m * (np.arctan2(yd, xd) - np.log(r / rd) / math.tan(math.radians(pitch_deg))) + phase0
    k = 3 if m <= 3 else 2  # sharper arms when there are few
    arm = ((1 + np.cos(phase)) / 2) ** k * (4 ** k / math.comb(2 * k, k))
    taper = np.clip((r - 0.6 * r_in) / (0.8 * r_in), 0, 1)
    return arm, taper ** 2 * (3 - 2 * taper)


class _Canvas:
    """g, r, i surface-brightness images of one cutout, in world units of a 424 px GZ2 image."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.s = n, WIDTH / n
        # pixel centres in float32 (speed); GalSim's array[j, i] is at (x_i, y_j)
        self.axis = ((np.arange(n) - (n - 1) / 2) * self.s).astype(np.float32)
        self.centre = rng.normal(0, 4, 2).astype(np.float32)  # GZ2 cutouts are centred
        self.x, self.y = self.axis[None, :] - self.centre[0], self.axis[:, None] - self.centre[1]
        self.bands = np.zeros((3, n, n), np.float32)

    def add(self, sb: np.ndarray, colour) -> None:
        for b in range(3):
            self.bands[b] += sb * np.float32(colour[b])

    def draw(self, obj: galsim.GSObject) -> np.ndarray:
        """A GalSim profile's surface brightness (no PSF yet), placed at the galaxy centre."""
        return obj.shift(*self.centre).drawImage(nx=self.n, ny=self.n, scale=self.s,
                                                 method="sb").array

    def points(self, pts, sigma, flux) -> np.ndarray:
        """Round Gaussians at points relative to the galaxy centre, each drawn within 4 sigma."""
        img = np.zeros((self.n, self.n), np.float32)
        for (px, py), sg, f in zip(np.asarray(pts) + self.centre, sigma, flux):
            sg = max(sg, 0.5 * self.s)  # at least a pixel wide, so no point falls between pixels
            i0, i1 = np.searchsorted(self.axis, [px - 4 * sg, px + 4 * sg])
            j0, j1 = np.searchsorted(self.axis, [py - 4 * sg, py + 4 * sg])
            gx = np.exp(-((self.axis[i0:i1] - px) / sg) ** 2 / 2)
            gy = np.exp(-((self.axis[j0:j1] - py) / sg) ** 2 / 2)
            img[j0:j1, i0:i1] += f / (2 * math.pi * sg * sg) * np.outer(gy, gx)
        return img


def _elliptical(c: _Canvas, truth, rng, flux, pa, p) -> tuple[float, np.ndarray]:
    hlr, sn = float(rng.uniform(20, 45)), float(rng.choice([2.5, 3, 4, 5]))
    profile = galsim.Sersic(sn, half_light_radius=hlr, trunc=6 * hlr, flux=flux)
    c.add(c.draw(profile.shear(q=truth["axis_ratio"], beta=pa * galsim.radians)), RED)
    p.update(hlr=hlr, sersic_n=sn)
    return hlr, RED


def _disk(c: _Canvas, truth, rng, flux, pa, p) -> tuple[float, np.ndarray]:
    """Face-on or edge-on disk with bulge; face-on ones get bar, arms (or a ring); edge-on dust."""
    rd = float(rng.uniform(22, 38))
    bt = {"no": 0.0, "just-noticeable": rng.uniform(0.06, 0.12), "obvious": rng.uniform(0.3, 0.5)}
    bt = float(bt[truth["bulge"]])
    b_hlr = float(rd * (rng.uniform(0.12, 0.2) if bt < 0.2 else rng.uniform(0.3, 0.45)))
    disk_flux, bulge_q = flux * (1 - bt), float(rng.uniform(0.75, 0.95))
    p.update(rd=rd, bulge_to_total=bt, bulge_hlr=b_hlr)
    if truth["type"] == "spiral":
        q = truth["axis_ratio"]
        xd, yd = _rotate(c.x, c.y, pa)
        yd = yd / q  # deprojected onto the disk plane
        disk = c.draw(_project(galsim.Exponential(scale_radius=rd, flux=disk_flux), q, pa))
        r_in = max(2.5 * b_hlr, 0.7 * rd)
        if truth["bar"]:
            bar_len, bar_angle = float(rd * rng.uniform(1.1, 1.6)), float(rng.uniform(0, math.pi))
            bar = galsim.Gaussian(sigma=bar_len / 2.2).transform(1, 0, 0, rng.uniform(0.16, 0.26))
            c.add(c.draw(_project(bar.withFlux(flux * rng.uniform(0.15, 0.25)), q, pa, bar_angle)), RED)
            r_in = max(r_in, bar_len)
            p.update(bar_length=bar_len, bar_angle=bar_angle)
        if truth["arms"]:
            m = {"2": 2, "3": 3}.get(truth["arms"]) or int(rng.choice([5, 6]))
            lo, hi = {"tight": (9, 14), "medium": (16, 22), "loose": (26, 34)}[truth["winding"]]
            pitch = float(rng.uniform(max(lo, 15) if m > 3 else lo, max(hi, 20)))
            # Barred spirals: the arms leave the ends of the bar.
            phase0 = (-m * (p["bar_angle"] - math.log(r_in / rd) / math.tan(math.radians(pitch)))
                      if truth["bar"] else float(rng.uniform(0, 2 * math.pi)))
            arm, taper = _spiral(xd, yd, rd, m, pitch, phase0, r_in)
            amp = float(rng.uniform(0.8, 0.95))
            c.add(disk * (1 - amp * taper), DISK)
            arms = disk * amp * taper * arm
            c.add(arms * 0.8, BLUE)  # young stars make the arms blue, and clumpy
            k, w = int(rng.integers(25, 60)), arms.ravel().astype(np.float64)
            idx = rng.choice(c.n * c.n, size=k, p=w / w.sum())
            knots = np.stack([c.axis[idx % c.n], c.axis[idx // c.n]], 1) - c.centre
            c.add(c.points(knots, rng.uniform(1.2, 2.5, k),
                           rng.exponential(0.2 * arms.sum() * c.s * c.s / k, k)), BLUE)
            p.update(arm_count=m, pitch_deg=pitch, arm_amplitude=amp)
        else:  # featureless disks: flat and blue, often with a star-forming ring
            c.add(disk, DISK)
            if rng.random() < 0.8:
                ring_r = float(rd * rng.uniform(1.3, 2.0))
                ring = np.exp(-((np.hypot(xd, yd) - ring_r) / (0.15 * rd)) ** 2 / 2)
                c.add(ring * disk_flux * 0.35 / (2 * math.pi * ring_r * 0.38 * rd), BLUE)
                p.update(ring_radius=ring_r)
        bulge_q = max(bulge_q, q)
    else:
        incl, h = float(rng.uniform(84, 90)), float(rd * rng.uniform(0.08, 0.13))
        q = math.hypot(math.cos(math.radians(incl)), h / rd)
        c.add(c.draw(_project(galsim.Exponential(scale_radius=1.3 * rd, flux=disk_flux), q, pa)), DISK)
        p.update(inclination_deg=incl, scale_height=h, q=q)
    if bt and truth["boxy"]:  # a 3x3 grid of Gaussians has box-shaped isophotes
        g = [galsim.Gaussian(sigma=b_hlr * 0.6).shift(b_hlr * i, b_hlr * j * 0.8)
             for i in (-1, 0, 1) for j in (-1, 0, 1)]
        c.add(c.draw(galsim.Add(g).withFlux(flux * bt).rotate(pa * galsim.radians)), RED)
    elif bt:
        bulge = galsim.Sersic(float(rng.choice([2, 3, 4])), half_light_radius=b_hlr,
                              trunc=8 * b_hlr, flux=flux * bt)
        c.add(c.draw(bulge.shear(q=bulge_q, beta=pa * galsim.radians)), RED)
    if truth["type"] == "edge-on disk":  # a dust lane, darker in g than in i, slightly off the
        xe, ye = _rotate(c.x, c.y, pa)  # midplane when the disk is not exactly edge-on
        lane = (np.exp(-((ye - h * (90 - incl) / 8) / max(0.8 * h, 2.0)) ** 2 / 2)
                * np.exp(-np.abs(xe) / (2.5 * rd)))
        tau = float(rng.uniform(1.2, 2.5)) * np.array([1.3, 1, .75], np.float32)
        c.bands *= np.exp(-tau[:, None, None] * lane)
    return 1.7 * rd, DISK


def _artifact(c: _Canvas, truth, rng, flux, pa, p) -> tuple[float, np.ndarray]:
    """A bright star with diffraction spikes, or a satellite trail in one band, by a faint galaxy."""
    xs, ys = _rotate(c.x, c.y, pa)
    if truth["artifact"] == "star":
        c.add(c.points([(0, 0)], [0.5], [flux * 3]), np.ones(3))
        spikes = sum(np.exp(-np.abs(a) / 40 - (b / 1.2) ** 2) for a, b in ((xs, ys), (ys, xs)))
        c.add(spikes * flux * 3e-4, np.ones(3))
    else:
        off = float(rng.uniform(-80, 80))
        c.add(flux * 6e-4 * np.exp(-((ys - off) / 2) ** 2 / 2), np.eye(3)[rng.integers(3)] + 0.2)
        p.update(trail_offset=off)
    c.add(c.draw(galsim.Exponential(scale_radius=float(rng.uniform(4, 8)), flux=flux * 0.03)), DISK)
    return 10.0, DISK


def _disturb(c: _Canvas, truth, rng, flux, host_r, colour, p) -> None:
    """A close companion joined by a tidal bridge, or a pair of tidal tails."""
    ang = float(rng.uniform(0, 2 * math.pi))
    if truth["disturbance"] == "companion":
        d = host_r * rng.uniform(1.6, 2.4)
        cxy = (d * math.cos(ang), d * math.sin(ang))
        comp = galsim.Sersic(float(rng.choice([1, 2, 4])), half_light_radius=host_r * 0.45,
                             trunc=3.6 * host_r, flux=flux * rng.uniform(0.3, 0.6))
        comp = comp.shear(q=float(rng.uniform(0.5, 1)), beta=rng.uniform(0, 3.2) * galsim.radians)
        c.add(c.draw(comp.shift(*cxy)), RED if rng.random() < 0.5 else DISK)
        tails = [_tail(rng, cxy, ang + math.pi * 0.8, d * 1.6, 5.0, flux * 0.3, 1.5)]
        p.update(companion_x=cxy[0], companion_y=cxy[1])
    else:
        curl = float(rng.choice([-1.6, 1.6]))
        tails = [_tail(rng, (0, 0), ang, host_r * 4, 6.0, flux * 0.35, curl),
                 _tail(rng, (0, 0), ang + math.pi, host_r * 3, 6.0, flux * 0.25, curl)]
    for pts, widths, fluxes in tails:
        c.add(c.points(pts, widths, fluxes), colour)


def render(truth: dict, rng: np.random.Generator, image_size: int = 424) -> np.ndarray:
    """Render one galaxy as an (image_size, image_size, 3) uint8 RGB array like an SDSS cutout.

    GalSim draws each component's surface brightness; components are summed per g, r, i band by
    colour, convolved with a double-Gaussian PSF, given sky noise and asinh-stretched. Random
    choices (sizes, angles, fluxes, PSF, noise) come from ``rng`` and go to ``truth["render"]``."""
    c, p = _Canvas(image_size, rng), {}
    flux, pa = float(10 ** rng.uniform(4.9, 5.4)), float(rng.uniform(0, math.pi))
    body = {"elliptical": _elliptical, "artifact": _artifact}.get(truth["type"], _disk)
    host_r, colour = body(c, truth, rng, flux, pa, p)
    p["radius"] = host_r  # the half-light radius, near enough: what votes.clarity reads
    if truth["disturbed"]:
        _disturb(c, truth, rng, flux, host_r, colour, p)
    for _ in range(rng.integers(0, 4)):  # field stars away from the target
        r, a = rng.uniform(120, 200), rng.uniform(0, 2 * math.pi)
        c.add(c.points([(r * math.cos(a), r * math.sin(a))], [0.5], [10 ** rng.uniform(2.7, 4.3)]),
              np.array([rng.uniform(0.5, 1.2), 1.0, rng.uniform(0.8, 1.3)]))
    fwhm = float(rng.uniform(3, 5.5))  # SDSS-like seeing, in pixels of a 424 px cutout
    psf = galsim.Add([galsim.Gaussian(fwhm=fwhm, flux=0.85),  # core and wings, like SDSS
                      galsim.Gaussian(fwhm=2.5 * fwhm, flux=0.15)])
    size = 2 * int(4 * fwhm / c.s) + 1
    bands = _convolve(c.bands, psf.drawImage(nx=size, ny=size, scale=c.s).array)
    sky = float(rng.uniform(0.8, 1.3))  # noise per 424-px pixel; coarser pixels average it down
    bands += rng.standard_normal(bands.shape, np.float32) * np.float32(sky / c.s)
    p.update(pa=pa, flux=flux, psf_fwhm=fwhm, sky_sigma=sky, centre=c.centre)
    truth["render"] = {k: [round(float(u), 3) for u in v] if np.ndim(v) else round(float(v), 4)
                       for k, v in p.items()}
    return lupton_rgb(bands)


def _convolve(bands: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """FFT convolution of each band with a small centred kernel, zero-padded (no wrap-around)."""
    n, k = bands.shape[-1], kernel.shape[0]
    shape = (scipy.fft.next_fast_len(n + k, real=True),) * 2
    f = scipy.fft.rfft2(bands, s=shape) * scipy.fft.rfft2(kernel.astype(np.float32), s=shape)
    return scipy.fft.irfft2(f, s=shape)[:, k // 2:k // 2 + n, k // 2:k // 2 + n]


def lupton_rgb(gri: np.ndarray, q: float = 10.0, stretch: float = 12.0) -> np.ndarray:
    """Lupton et al. (2004) asinh stretch of (3, H, W) g, r, i surface brightness to uint8 RGB
    (i->R, r->G, g->B), saturating bright pixels without changing their colour."""
    rgb = np.clip(gri[::-1], 0, None)
    intensity = rgb.mean(axis=0)
    rgb *= np.arcsinh(q * intensity / stretch) / q / np.maximum(intensity, 1e-9)
    rgb /= np.maximum(rgb.max(axis=0), 1.0)
    return np.ascontiguousarray((rgb * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0))


# ---------------------------------------------------------------- catalogue

def _galaxy(seed: int, index: int, image_size: int) -> dict:
    """One catalogue row. Truth, image and votes use separate streams: a change to the
    renderer leaves every galaxy's truth as it was, and its votes too unless it changes what
    the votes read of the picture (``votes.picture_measures``)."""
    truth = draw_truth(np.random.default_rng([seed, index, 0]))
    pixels = render(truth, np.random.default_rng([seed, index, 1]), image_size)
    votes = simulate_votes(truth, np.random.default_rng([seed, index, 2]))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    id_str = f"synth-{seed}-{index}"
    return {"image": {"bytes": buf.getvalue(), "path": f"{id_str}.jpg"}, "id_str": id_str,
            **votes, "synthetic_truth": json.dumps(truth, sort_keys=True)}


def _features():
    import datasets

    cols = {c: datasets.Value("float64" if c.endswith("_fraction") else "int64")
            for c in vote_columns()}
    return datasets.Features({"image": datasets.Image(), "id_str": datasets.Value("string"), **cols,
                              "synthetic_truth": datasets.Value("string")})


def _rows(seed, n, image_size, workers):
    if workers <= 1:
        yield from (_galaxy(seed, i, image_size) for i in range(n))
        return
    import multiprocessing

    # Ordered imap keeps rows in index order; each row depends only on (seed, index).
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_galaxy_star, ((seed, i, image_size) for i in range(n)), chunksize=8)


def _galaxy_star(args):
    return _galaxy(*args)


def synthesize(out_dir: str | os.PathLike, n: int, *, seed: int = 0, image_size: int = 424,
               shard_rows: int = 1000, workers: int | None = None,
               overwrite: bool = False) -> list[Path]:
    """Render ``n`` galaxies into ``out_dir/data/train-0000i-of-0000K.parquet`` (Hub layout) and
    record the settings in ``out_dir/synth.json``.

    Same arguments give byte-identical shards whatever ``workers`` is (default: the CPUs, for
    n >= 200). The folder is built beside ``out_dir`` and swapped in whole, so it holds one
    catalogue; a catalogue of other settings there needs ``overwrite``, anything else is
    refused (:func:`galaxy_llava.outputs.claim`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    for name, value, low in (("n", n, 1), ("shard_rows", shard_rows, 1), ("seed", seed, 0),
                             ("image_size", image_size, MIN_IMAGE_SIZE)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise UserError(f"{name} must be an integer >= {low} (got {value!r})")
    if image_size > 4096:
        raise UserError(f"image_size must be <= 4096 (got {image_size})")
    if seed >= 2**32:
        raise UserError(f"seed must be below 2**32 (got {seed})")
    identity = {"format": SYNTH_FORMAT, "n": int(n), "seed": int(seed),
                "image_size": int(image_size), "shard_rows": int(shard_rows)}
    outputs.claim(out_dir, "catalogue", overwrite=overwrite, identity=identity)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n >= 200 else 1
    schema = _features().arrow_schema
    k = -(-n // shard_rows)
    names = [f"data/train-{i:05d}-of-{k:05d}.parquet" for i in range(k)]
    rows: list[dict] = []
    with outputs.staged_folder(out_dir) as stage, \
            tqdm(total=n, desc="synth", unit="galaxy") as bar:
        (stage / "data").mkdir()
        for row in _rows(int(seed), int(n), int(image_size), workers):
            rows.append(row)
            bar.update()
            if len(rows) == shard_rows or bar.n == n:
                pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                               stage / names[(bar.n - 1) // shard_rows], row_group_size=100)
                rows = []
        write_json(stage / outputs.SYNTH_MARKER, identity)
    return [Path(out_dir) / name for name in names]
