"""corral's agent: stdlib only, Python 3.8+, shipped to hosts as a zipapp; also home of the wire protocol."""

__version__ = "0.1.0"
