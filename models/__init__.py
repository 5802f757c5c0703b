"""DiffuseExpand: the method (Stages I-IV) as a library. See models/README in the project README."""

__version__ = "0.1.0"
