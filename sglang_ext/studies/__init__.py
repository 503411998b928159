"""Studies the quickstart and the analysis scripts share (one home each): the workload-shift run and the
"tuning pays" check."""
