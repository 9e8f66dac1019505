"""The project's shared, model-independent core.

The canonical copy lives in the repository's top-level core/ folder; every model folder holds a
byte-identical copy so that it runs when copied alone. Edit the top-level copy, then run
`make vendor`; `make test` fails when a copy differs.
"""
