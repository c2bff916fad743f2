"""The library side of `medcl export`: the format dispatch (`formats`), nnU-Net v2 raw datasets (`nnunet`),
MONAI datalists (`monai_datalist`), and the shared staging of files into an atomic output (`staging`)."""
