"""Level-2: stackers over out-of-fold predictions, concat-fusion, submission and the run command."""
