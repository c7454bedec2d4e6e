"""Names the command line offers before anything heavy is imported (``kvpipe --help`` loads no torch)."""

TASK_KINDS = ("single", "multikey", "multivalue", "multiquery", "vartrack", "common_words", "prose_qa")
PROBES = ("recovery", "value ranking", "coupled projection")
