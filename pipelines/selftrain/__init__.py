"""ELTA's APDS sharpening, the (beta, t) grid search and pseudo-labelling."""
