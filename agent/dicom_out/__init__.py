"""DICOM output: each finished sCT volume as a CT Image Storage series on disk, and C-STORE to a peer."""
