"""Everything that happens inside one hospital: data loading, LR synthesis, local training."""
