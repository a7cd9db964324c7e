"""A stepwise user project: majority parity of variable-length token sequences."""
