"""Reading DICOM into volumes: files and zips (`scan`, `source`), one record per frame (`frames`),
series grouping and sorting (`series`), pixels to NIfTI (`volume`), DICOM-SEG objects to label volumes
(`seg_reader`), and the whole chain for ingest (`cases`)."""
