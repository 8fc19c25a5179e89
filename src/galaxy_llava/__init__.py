"""galaxy-llava: teach LLaVA-style vision-language models to describe galaxies."""

__version__ = "0.1.0"
