"""Example datasets and the scripts that derive them (not part of the installed package)."""
