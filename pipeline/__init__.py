"""headbench: extract frozen CNN features once, then compare classifier heads in seconds."""

__version__ = "0.1.0"
