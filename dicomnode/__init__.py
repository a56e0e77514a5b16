"""dicomnode: a DICOM node that synthesises PET/T2FS fusion images from sagittal T2 fat-sat spine MR."""

__version__ = "0.1.0"

# How the node names itself in association negotiation (A-ASSOCIATE-RQ/AC user information) and
# in its DICOM Conformance Statement (docs/reference/conformance.md).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.11733626418619377248385203768977228413"
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]
