"""Tools for the repository, not shipped in corral's wheel: the screenshots, the demo journal, the sshd lab.

Run them from the repository's root (`python -m scripts.screenshots`); tests and bench import them, and they
import neither."""
