"""YAML templates shipped with medcl (loaded with importlib.resources)."""
