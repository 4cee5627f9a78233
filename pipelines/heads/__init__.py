"""The TMCR head: model, losses, TFA, L_u; build / load / predict; its training methods."""
