"""The Textual console: the operator's keyboard view of one master, its jobs and its agents."""
