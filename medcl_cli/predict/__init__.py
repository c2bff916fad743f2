"""The library side of `medcl predict`: finding the inputs (`discover`: what to segment, without
the run's label series; `inputs`, `dicom_inputs`, `channel_inputs`, `item`), running the
network over a volume on its own grid (`inference`), the batch with resume and sidecars (`runner`), and
writing predictions as DICOM SEG (`seg_writer`)."""
