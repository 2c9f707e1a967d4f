"""The DICOM node: C-ECHO and C-STORE SCP (pynetdicom) in front of the archive."""
