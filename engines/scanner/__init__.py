"""Scanner simulator: exports phantom cases as DICOM the way Siemens- and Philips-like consoles do."""
