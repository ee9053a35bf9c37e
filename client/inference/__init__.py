"""``fedsr infer``: a trained model applied to a radiologist's scan, the result written back in patient space.

``model`` (checkpoint -> model, intensity rule, fit checks), ``scans`` (what to read, read once), ``resample``
(the interpolation on the output grid), ``run`` (one scan: read, super-resolve slab by slab, map back to scanner
units, write as produced), ``nifti_out`` / ``dicom_out`` (the writers), ``staging`` (outputs appear whole or not at
all), ``preview`` (a PNG per scan), ``batch`` (a folder of scans), ``cli`` (the command).
"""
