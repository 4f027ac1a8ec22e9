"""The job master: scheduler, journal and the managers server that exposes them."""
