"""Site folders -> volumes (NIfTI, DICOM) -> normalised arrays, with validation and subject-level splits."""
