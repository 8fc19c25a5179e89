"""FITS cutouts as surveys deliver them, made into the RGB picture a model reads.

* **HDU.** The first image HDU with pixels, never a table (a catalogue ``.fits`` beside the
  cutouts, a primary HDU without data); :attr:`FitsOptions.hdu` (``--fits-hdu N|NAME``) picks one.
* **Bands.** One plane is grey; three planes, in order of increasing wavelength (g, r, z), are
  blue, green, red as in SDSS composites. :attr:`FitsOptions.bands` (``--bands``) chooses and
  orders the planes of a cube of any depth, by index (0 is the first plane) or by the name the
  header gives (``BAND<k>``, ``FILTER<k>``: Legacy Survey cutouts), and names the bands of
  single-band files of one object (``J1234-g.fits``, ``J1234-r.fits``, ...), read together.
* **Background.** NaN and inf pixels are masked and filled with the band's sigma-clipped sky
  level (:func:`astropy.stats.sigma_clipped_stats`), and that constant level is subtracted
  (``keep_sky`` keeps it): a pedestal (DSS, HST raw frames) would otherwise grey the picture.
* **Colour.** Default ``lupton``: the asinh scheme of Lupton et al. (2004) with which SDSS made
  the colour images Galaxy Zoo 2 was classified on (:func:`astropy.visualization.make_lupton_rgb`),
  softening ``q`` (Q, 8) and linear ``stretch`` (a pixel of ``stretch / 10`` shows at 10% grey,
  whatever Q). By default the stretch is 10 times the sigma-clipped noise of the sky: the sky's
  noise shows as a faint grain at 10% grey whatever the file's flux units, as in SDSS's images
  (noiseless images: their 99.5th percentile just saturates). ``percentile``: an asinh stretch between the 0.5th and 99.5th percentiles
  of all bands together (what galaxy-llava did before).
* **Refused**, in one line naming the file: no image HDU, a zero-size image, no finite pixel,
  a constant image. The pixel count is checked from the header before any data is read (the
  decompression-bomb guard, as for PNG/JPEG).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Sequence

from galaxy_llava.errors import UserError

SCALINGS = ("lupton", "percentile")
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz", ".fits.fz")
NOISE_STRETCH = 10.0  # the default Lupton stretch, in units of the sky's noise


def is_fits(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a FITS file (by its suffix, case-insensitive)."""
    return str(path).lower().endswith(FITS_SUFFIXES)


@dataclass(frozen=True)
class FitsOptions:
    """How FITS cutouts become RGB (see the module's docstring); the defaults suit GZ2-trained
    models. ``bands``: plane indices (as text) or band names, bluest first."""

    hdu: int | str | None = None
    bands: tuple[str, ...] = ()
    scaling: str = "lupton"
    stretch: float | None = None
    q: float = 8.0
    keep_sky: bool = False

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise UserError(f"--scaling must be one of {', '.join(SCALINGS)} "
                            f"(got {self.scaling!r})")
        if len(self.bands) not in (0, 1, 3):
            raise UserError(f"--bands names 1 or 3 bands (got {len(self.bands)}: "
                            f"{','.join(self.bands)})")
        for name, value in (("--lupton-stretch", self.stretch), ("--lupton-q", self.q)):
            if value is not None and not (value > 0 and value < float("inf")):
                raise UserError(f"{name} must be a positive number (got {value})")

    def to_dict(self) -> dict:
        """The settings as JSON (recorded in a catalogue's identity)."""
        return {**asdict(self), "bands": list(self.bands)}

    @property
    def band_names(self) -> tuple[str, ...]:
        """The bands given by name (not by plane index): what single-band files are grouped by."""
        return tuple(b for b in self.bands if not b.isdigit())


def parse_options(hdu: str | None = None, bands: str | None = None, scaling: str = "lupton",
                  stretch: float | None = None, q: float = 8.0,
                  keep_sky: bool = False) -> FitsOptions:
    """:class:`FitsOptions` from command-line text: ``--fits-hdu 1`` is an index, anything else
    an EXTNAME; ``--bands g,r,z`` (or ``0,1,3``) is split at commas."""
    chosen = None if hdu is None else int(hdu) if str(hdu).strip().isdigit() else str(hdu).strip()
    names = tuple(b.strip() for b in bands.split(",")) if bands else ()
    if any(not b for b in names):
        raise UserError(f"--bands {bands}: an empty band name")
    return FitsOptions(chosen, names, scaling, stretch, q, keep_sky)


# ----------------------------------------------------------------- reading

def _dims(header) -> list[int]:
    """The axis lengths (NAXIS1 first), from an image header or a compressed one's ZNAXISn."""
    key = "ZNAXIS" if "ZNAXIS" in header else "NAXIS"
    return [int(header.get(f"{key}{k}", 0) or 0) for k in range(1, int(header.get(key, 0)) + 1)]


def plane_names(header, planes: int) -> list[str | None]:
    """Each plane's band name from ``BAND<k>``/``FILTER<k>`` (numbered from 0 or from 1); a
    single plane may say it with ``BAND``/``FILTER``."""
    names: list[str | None] = [None] * planes
    for prefix in ("FILTER", "BAND"):  # BAND wins where both are there
        found = {int(m.group(1)): str(header[key]).strip() for key in header
                 if (m := re.fullmatch(rf"{prefix}(\d+)", key))}
        offset = 1 if found and min(found) == 1 and max(found) == planes else 0
        for k, value in found.items():
            if 0 <= k - offset < planes:
                names[k - offset] = value
        if planes == 1 and prefix in header:
            names[0] = str(header[prefix]).strip()
    return names


def _choose_hdu(hdus, path, choice):
    """The HDU to read: ``choice`` (index or EXTNAME), else the first image HDU with pixels."""
    if choice is not None:
        try:
            hdu = hdus[choice]
        except (KeyError, IndexError):
            raise UserError(f"{path}: no HDU {choice!r} (--fits-hdu; it has {len(hdus)} HDUs: "
                            f"{', '.join(h.name for h in hdus)})") from None
        if not hdu.is_image:
            raise UserError(f"{path}: HDU {choice!r} is a table, not an image (--fits-hdu)")
        if not any(_dims(hdu.header)) or 0 in _dims(hdu.header):
            raise UserError(f"{path}: HDU {choice!r} has no pixels (zero-size image)")
        return hdu
    zero_size = False
    for hdu in hdus:
        dims = _dims(hdu.header)
        if not hdu.is_image or len(dims) < 2:
            continue
        if 0 in dims:
            zero_size = True
            continue
        return hdu
    if zero_size:
        raise UserError(f"{path}: its image has no pixels (zero-size image)")
    raise UserError(f"{path}: no image HDU in it (tables or headers only)")


def _plane_indices(path, header, dims: list[int], options: FitsOptions) -> list[int] | None:
    """Which planes of a cube to read, in order (None: a 2-D image)."""
    planes = 1
    for d in dims[2:]:
        planes *= d
    if len(dims) > 3 and planes != dims[2]:
        raise UserError(f"{path}: a {len(dims)}-D image; only 2-D images and 3-D cubes are read")
    if len(dims) == 2:
        return None
    names = plane_names(header, planes)
    labels = [n or str(k) for k, n in enumerate(names)]
    # A PSF grid or a spectral cube has dozens of planes: the first and last few name it.
    listed = ", ".join(labels if len(labels) <= 8 else [*labels[:3], "...", *labels[-2:]])
    if not options.bands:
        if planes in (1, 3):
            return list(range(planes))
        raise UserError(f"{path}: a cube of {planes} planes ({listed}); choose 1 or 3 with "
                        "--bands (plane indices or band names, bluest first)")
    chosen = []
    for band in options.bands:
        if band.isdigit():
            k = int(band)
        else:
            k = next((i for i, n in enumerate(names) if n and n.lower() == band.lower()), -1)
        if not 0 <= k < planes:
            raise UserError(f"{path}: no band {band!r} (--bands; its planes: {listed})")
        chosen.append(k)
    return chosen


def read_planes(path: str | os.PathLike, options: FitsOptions, max_pixels: int,
                read: bool = True):
    """The chosen planes of one FITS file as a float64 array (planes, height, width), bottom row
    first as stored; ``read=False`` checks the headers only (None)."""
    import numpy as np
    from astropy.io import fits

    try:
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdus:
            hdu = _choose_hdu(hdus, path, options.hdu)
            dims = _dims(hdu.header)
            chosen = _plane_indices(path, hdu.header, dims, options)
            if dims[0] * dims[1] > max_pixels or dims[0] * dims[1] * len(chosen or [0]) \
                    > 3 * max_pixels:
                raise UserError(f"{path} is too large to open safely ({dims[0]}x{dims[1]}; "
                                "decompression-bomb guard)")
            if not read:
                return None
            data = np.asarray(hdu.data, dtype=np.float64)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"cannot read FITS image {path}: {e}") from None
    if chosen is None:
        return data.reshape(1, dims[1], dims[0])
    return data.reshape(-1, dims[1], dims[0])[chosen]


def _subtract_sky(path, planes, keep_sky: bool):
    """NaN/inf filled with each plane's sigma-clipped sky level, which is then subtracted unless
    ``keep_sky``; refuses an image with no finite pixel or no variation."""
    import numpy as np
    from astropy.stats import sigma_clipped_stats

    values = planes[np.isfinite(planes)]
    if not values.size:
        raise UserError(f"{path}: no finite pixel (all NaN or inf): nothing to describe")
    if values.min() == values.max():
        raise UserError(f"{path}: a constant image (every pixel {values.min():g}): nothing "
                        "to describe")
    out = []
    for plane in planes:
        finite = np.isfinite(plane)
        _, sky, _ = sigma_clipped_stats(plane[finite], sigma=3.0, maxiters=5) \
            if finite.any() else (0.0, 0.0, 0.0)  # a blank band among others: black
        plane = np.where(finite, plane, sky)
        out.append(plane if keep_sky else plane - sky)
    return np.stack(out)


def planes_to_rgb(path, planes, options: FitsOptions):
    """An RGB PIL image of 1 or 3 planes (bluest first, FITS row order) by ``options``."""
    import numpy as np
    from PIL import Image

    data = _subtract_sky(path, planes, options.keep_sky)
    if options.scaling == "lupton":
        from astropy.stats import sigma_clipped_stats
        from astropy.visualization import make_lupton_rgb

        mean = data.mean(axis=0)
        stretch = options.stretch
        if stretch is None:
            noise = sigma_clipped_stats(mean, sigma=3.0, maxiters=5)[2]
            if noise > 0:
                stretch = NOISE_STRETCH * noise
            else:  # no noise (a model, a simulation): the 99.5th percentile just saturates
                top = max(float(np.percentile(mean, 99.5)), float(mean.max()) * 1e-3, 1e-30)
                stretch = top * options.q / np.sinh(np.arcsinh(0.1 * options.q) / 0.1)
        red, green, blue = (data[0],) * 3 if len(data) == 1 else (data[2], data[1], data[0])
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 where the sky is black
            pixels = make_lupton_rgb(red, green, blue, minimum=0.0, stretch=stretch,
                                     Q=options.q)
    else:
        from astropy.visualization import AsinhStretch, PercentileInterval

        # One interval over all bands keeps the colours; asinh shows faint outskirts.
        lo, hi = PercentileInterval(99.0).get_limits(data)
        scaled = np.clip((data - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(data)
        grey = (np.clip(AsinhStretch(a=0.1)(scaled), 0, 1) * 255).round().astype(np.uint8)
        pixels = (np.stack([grey[0]] * 3) if len(grey) == 1 else grey[::-1]).transpose(1, 2, 0)
    # FITS rows run bottom-up; images top-down.
    return Image.fromarray(np.ascontiguousarray(pixels[::-1]))


def read_fits_rgb(paths: str | os.PathLike | Sequence[str | os.PathLike],
                  options: FitsOptions | None = None, max_pixels: int | None = None,
                  decode: bool = True):
    """One object's FITS file, or its single-band files (bluest first), as an RGB PIL image; with
    ``decode=False`` only the headers are checked (None). Unreadable files are UserErrors."""
    import numpy as np
    from PIL import Image

    options = options or FitsOptions()
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS
    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if len(files) > 1:  # one band per file: the --bands names apply to the files, not planes
        options = FitsOptions(options.hdu, (), options.scaling, options.stretch, options.q,
                              options.keep_sky)
    planes = [read_planes(f, options, max_pixels, read=decode) for f in files]
    if not decode:
        return None
    if len(files) > 1:
        if any(len(p) != 1 for p in planes):
            raise UserError(f"{files[0]}: the files of one object's bands need one plane each")
        if len({p.shape for p in planes}) > 1:
            raise UserError(f"{files[0]}: its band files differ in size "
                            f"({', '.join('x'.join(map(str, p.shape[:0:-1])) for p in planes)})")
        data = np.concatenate(planes)
    else:
        data = planes[0]
    if len(data) not in (1, 3):
        raise UserError(f"{files[0]}: {len(data)} bands; 1 or 3 make a picture")
    return planes_to_rgb(files[0], data, options)
