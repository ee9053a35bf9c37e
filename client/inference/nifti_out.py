"""Writing the SR output as NIfTI while it is produced.

A NIfTI-1 file is a 352-byte header and the voxels in Fortran order (x fastest, then y, then z), so whole slices
in Z order are plain appends: each slab is written as it comes, through gzip for ``.nii.gz`` (level 1, nibabel's
default), and the output never has to be held whole. The header's qform and sform are both the output affine.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np

from client.inference.staging import StagedOutput

_HEADER_BYTES = 352  # the 348-byte header and the 4-byte extension flag
_DESCRIPTION_BYTES = 79  # the header's descrip field (80 bytes, NUL-terminated)


class NiftiWriter(StagedOutput):
    """Write an (X, Y, Z) volume of ``shape`` to ``path`` (.nii or .nii.gz) slab by slab along Z.

    ``affine``: (4, 4) voxel -> world mm (RAS+), stored as qform and sform with ``xform_code``. ``dtype``: the
    file's data type (int16/uint16: values are rounded and clipped to it; float32 stored as is). ``description``:
    the header's description (cut to 79 characters). Values are written in scanner units, unscaled.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int], affine: np.ndarray, dtype: np.dtype, *,
                 xform_code: int, description: str, overwrite: bool) -> None:
        header = nib.Nifti1Header()
        header.set_data_shape(shape)
        header.set_data_dtype(dtype)
        header.set_qform(affine, xform_code)
        header.set_sform(affine, xform_code)
        header.set_xyzt_units("mm")
        header.set_data_offset(_HEADER_BYTES)
        header["descrip"] = description.encode("ascii", "replace")[:_DESCRIPTION_BYTES]
        super().__init__(path, folder=False, overwrite=overwrite)
        self.shape, self.dtype = shape, np.dtype(dtype)
        self._next = 0
        compressed = path.name.lower().endswith(".gz")
        self._handle: BinaryIO = gzip.open(self.temp, "wb", compresslevel=1) if compressed else open(self.temp, "wb")
        header.write_to(self._handle)

    def write(self, z0: int, block: np.ndarray) -> None:
        """Append output slices ``z0 ..`` (float32 (X, Y, n), scanner units); slabs must come in order."""
        if z0 != self._next or block.shape[:2] != self.shape[:2]:
            raise ValueError(f"expected slices from {self._next} of {self.shape[:2]}, got {z0} of {block.shape[:2]}")
        if self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            block = np.clip(np.rint(block), info.min, info.max)
        self._handle.write(np.asarray(block, dtype=self.dtype).tobytes(order="F"))
        self._next += block.shape[2]

    def commit(self) -> Path:
        """Close the file, check every slice was written, move it into place."""
        self._handle.close()
        if self._next != self.shape[2]:
            raise ValueError(f"{self.destination}: {self._next} of {self.shape[2]} slices written")
        return super().commit()

    def discard(self) -> None:
        self._handle.close()
        super().discard()
