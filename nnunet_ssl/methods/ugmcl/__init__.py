"""UG-MCL: uncertainty-guided mutual consistency learning (paper 001), and the mean-teacher family built from
the same parts (mean teacher, uncertainty-aware mean teacher, dual-task consistency)."""
