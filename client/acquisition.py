"""A site's acquisition description, what a scanner-aware model is conditioned on (``condition = "acquisition"``).

Four numbers in their units (:data:`shared_models.conditioning.ACQUISITION_FIELDS`), each from the first source that
has it:

1. the acquisition profile that ``site.toml`` declares (``[acquisition]``) and its ``scanner`` name: field strength
   from the preset's name (``mr-3t-...``, ``mr-1.5t-...``) or the scanner's (``"Siemens Prisma 3T"``), 0 T for CT;
   slice thickness (``slice_thickness_mm``; a thin-slice profile says nothing); kernel sharpness from the in-plane
   model (k-space: the band kept x the window's weight, none 1, Tukey 0.75, Hann 0.5; PSF: 1 / (1 + FWHM in LR
   pixels)); noise level (``noise_level``, 0 for ``noise = "none"``);
2. the site's DICOM headers (``MagneticFieldStrength``, ``SliceThickness``, ``ConvolutionKernel``; the median over up
   to :data:`MAX_HEADERS` files, the most common kernel);
3. for a site whose ``site.toml`` declares no profile, the headers come first and the default profile (which made its
   low-resolution scans) fills the rest;
4. :data:`DEFAULTS`: 1.5 T (the most common clinical field; 0 T for CT), 1 mm (thin slices), sharpness 0.5.

Nothing of it leaves the site: it is set on the model at the site (:func:`shared_models.conditioning.set_acquisition`).
"""

from __future__ import annotations

import functools
import re
import statistics
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from client.data.files import list_scan_files
from client.data.nifti import is_nifti
from client.degrade import AcquisitionProfile
from client.pairs import PreparedSite

#: Values no source gives (units as :data:`shared_models.conditioning.ACQUISITION_FIELDS`); field strength by modality.
DEFAULTS = {"slice_thickness_mm": 1.0, "kernel_sharpness": 0.5, "noise_level": 0.0}
DEFAULT_FIELD_STRENGTH_T = {"MR": 1.5, "CT": 0.0}
#: At most this many DICOM files' headers are read (sorted by path) to describe a site.
MAX_HEADERS = 32
#: Weight of each k-space apodisation in the sharpness (the share of the kept band it leaves nearly untouched).
WINDOW_SHARPNESS = {"none": 1.0, "tukey": 0.75, "hann": 0.5}
#: GE-style kernel names, smooth to sharp, as sharpness in [0, 1] (other vendors: the kernel's number / 100).
NAMED_KERNELS = {"SOFT": 0.2, "STANDARD": 0.4, "DETAIL": 0.55, "CHEST": 0.6, "LUNG": 0.75, "BONE": 0.85, "EDGE": 0.95}
_TESLA = re.compile(r"(\d+(?:\.\d+)?)\s*t\b", re.IGNORECASE)
_KERNEL_NUMBER = re.compile(r"(\d{2})")


def site_acquisition(site: PreparedSite) -> dict[str, float]:
    """The site's acquisition description ``{field: value}`` (module docstring for the sources)."""
    modality = site.config.modality
    profile = profile_description(site.profile, site.config.scanner)
    headers = dicom_description(str(site.directory))
    layers = [headers, profile] if site.config.acquisition else [profile, headers]  # later layers win
    merged = {"field_strength_t": DEFAULT_FIELD_STRENGTH_T[modality], **DEFAULTS}
    for layer in layers:
        merged.update({key: value for key, value in layer.items() if value is not None})
    return merged


def profile_description(profile: AcquisitionProfile, scanner: str = "") -> dict[str, float | None]:
    """What an acquisition profile (and the scanner's name) tells of the description; None where it says nothing."""
    if profile.inplane == "kspace":
        sharpness = profile.kspace_fraction * WINDOW_SHARPNESS[profile.kspace_window]
    else:
        sharpness = 1.0 / (1.0 + profile.psf_fwhm_lr_px)
    return {
        "field_strength_t": 0.0 if profile.modality == "CT" else _tesla(_preset(profile).replace("-", " "), scanner),
        "slice_thickness_mm": profile.slice_thickness_mm,
        "kernel_sharpness": sharpness,
        "noise_level": 0.0 if profile.noise == "none" else profile.noise_level,
    }


@functools.cache
def dicom_description(site_dir: str) -> dict[str, float]:
    """What the DICOM headers of the site's files say (only the fields found; :func:`header_description` per file,
    the median of each number and the most common kernel); read once per process."""
    import pydicom  # the site's stack: imported on use, as the readers are

    found: dict[str, list[float]] = {}
    files = [path for path in list_scan_files(Path(site_dir)) if not is_nifti(path.name)]
    for path in files[:MAX_HEADERS]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # odd values are the reader's to report, not this summary's
                ds = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["MagneticFieldStrength", "SliceThickness", "ConvolutionKernel"])
        except Exception:  # a corrupt file may raise anything: the reader reports it, here it has no header
            continue
        for field, value in header_description(ds).items():
            found.setdefault(field, []).append(value)
    described = {field: statistics.median(values) for field, values in found.items() if field != "kernel_sharpness"}
    if found.get("kernel_sharpness"):
        described["kernel_sharpness"] = Counter(found["kernel_sharpness"]).most_common(1)[0][0]
    return described


def header_description(header: Any) -> dict[str, float]:
    """What one DICOM header (a pydicom ``Dataset``, or None) says of the acquisition: ``field_strength_t``
    (MagneticFieldStrength, T), ``slice_thickness_mm`` (SliceThickness) and ``kernel_sharpness``
    (ConvolutionKernel, its first value, :func:`kernel_sharpness`); only the fields present with a value > 0 (a
    kernel: one it can read)."""
    if header is None:
        return {}
    found = {}
    for field, keyword in (("field_strength_t", "MagneticFieldStrength"), ("slice_thickness_mm", "SliceThickness")):
        value = _number(header.get(keyword))
        if value is not None:
            found[field] = value
    kernel = header.get("ConvolutionKernel")
    sharpness = kernel_sharpness(str(kernel if isinstance(kernel, str) else kernel[0])) if kernel else None
    if sharpness is not None:
        found["kernel_sharpness"] = sharpness
    return found


def kernel_sharpness(kernel: str) -> float | None:
    """A reconstruction kernel's name as sharpness in [0, 1]: GE-style names (:data:`NAMED_KERNELS`), else its
    two-digit number / 100 (Siemens-style ``B30f`` -> 0.3, ``Br64`` -> 0.64); None when neither."""
    name = kernel.strip().upper()
    if name in NAMED_KERNELS:
        return NAMED_KERNELS[name]
    number = _KERNEL_NUMBER.search(name)
    return int(number.group(1)) / 100.0 if number else None


def _preset(profile: AcquisitionProfile) -> str:
    """The preset's name (``mr-3t-kspace``) without the site's overrides (``[noise_level=0.02]``)."""
    return profile.name.partition("[")[0]


def _tesla(*texts: str) -> float | None:
    """The first field strength written as ``3T`` / ``1.5 T`` in ``texts``."""
    for text in texts:
        found = _TESLA.search(text)
        if found:
            return float(found.group(1))
    return None


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
