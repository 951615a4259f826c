"""diffalign: align diffusion and flow-matching generators with human preferences."""

__version__ = "0.1.0"
