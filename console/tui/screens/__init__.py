"""The console's screens: main, submit, job detail, confirm, help, and quit (stop or detach)."""
