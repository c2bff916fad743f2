"""The library side of `medcl demo`: a synthetic DICOM study (`dicom_writer`) and the whole chain run on it
(`chain`)."""
