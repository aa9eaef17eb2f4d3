"""dml-study: hyperparameter studies of deep-metric-learning losses."""
