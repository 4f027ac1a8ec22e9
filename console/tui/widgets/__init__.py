"""The console's widgets: the job and worker tables, and the stats header."""
