"""Kill-and-restart drills for flcluster, and the process harness they share with the tests.

See ``recovery/README.md`` and ``spec/recovery.md`` (the crash points the drills hit).
"""
