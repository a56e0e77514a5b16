"""dicomnode: a DICOM node that synthesises PET/T2FS fusion images from sagittal T2 fat-sat spine MR."""

__version__ = "0.1.0"
