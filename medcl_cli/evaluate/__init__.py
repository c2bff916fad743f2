"""The library side of `medcl evaluate`: scoring a split per 3D volume (`scoring`), the metrics (`metrics`),
overlay pictures (`overlays`) and the HTML report (`report_html`)."""
