"""dvd: Double Visual Defense."""

__version__ = "0.1.0"
