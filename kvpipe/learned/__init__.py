"""Learning retention gates: training on generated tasks (``train``) and distillation from reconstruction scores
(``distill``). The gates themselves, which a stage runs at compression time, are ``kvpipe.core.gates``."""
