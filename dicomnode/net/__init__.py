"""DICOM networking: the SCP that receives and the SCU that echoes and sends."""
