"""The fast tier: in-process tests (scheduler on a temporary journal, validators, parsers), seconds in all."""
