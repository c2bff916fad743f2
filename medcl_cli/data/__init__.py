"""Reading DICOM/NIfTI, ingesting datasets, and the training slice dataset."""
