"""The library side of the read-only commands: `medcl runs` lists run folders (`run_index`), `medcl info` tells
the version, devices, methods and templates (`info`)."""
