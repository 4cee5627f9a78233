"""Ray Tune searches over the stages' own loops."""
