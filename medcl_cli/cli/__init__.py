"""The Typer app: the only package that imports typer and rich."""
