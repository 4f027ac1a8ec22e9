"""corral's operator side: the console, the master, the client, the CLI and deployment."""

__version__ = "0.1.0"
