"""Level-1: heads trained per backbone on shared folds, out-of-fold and test predictions."""
