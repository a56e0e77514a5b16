"""Helpers shared by the tests: DICOM factories, test doubles, node configs, real-peer plumbing."""
