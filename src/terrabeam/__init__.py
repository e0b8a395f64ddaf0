"""terrabeam: run trained models over satellite imagery on Apache Beam, patch by patch."""

__version__ = "0.1.0"

NAMESPACE = "terrabeam"  # of the Beam metrics terrabeam's transforms count
