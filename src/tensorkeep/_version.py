"""The version of tensorkeep (one place; the package and its manifests read it)."""

__version__ = "0.1.0"
